"""Benchmark plumbing: a short run writes well-formed rows (the figures come from the GPU)."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_bench_loss_writes_rows(tmp_path, capsys):
    import bench_loss

    out = tmp_path / "loss.jsonl"
    assert bench_loss.main(["--sizes", "24", "--dims", "8", "--impl", "eager", "triton",
                            "--repeats", "3", "--warmup", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4   # 2 implementations x (fwd, fwd+bwd)
    for r in rows:
        assert r["B"] == 24 and r["M"] == 48 and r["D"] == 8 and r["median_ms"] > 0
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["repeats"] == 3
        assert r["machine"] and r["versions"]["torch"] and r["git"]
        assert r["tflops"] > 0 and r["flop_count"]
    tri = [r for r in rows if r["impl"] == "triton"]
    assert all(r["vs_eager"] > 0 for r in tri)
    assert "median ms" in capsys.readouterr().out
