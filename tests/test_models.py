"""Networks: parameter counts of Tran et al.'s definitions, shapes, torchvision's layout."""
import numpy as np
import pytest
import torch

from fastavts.models.audio import AudioNet
from fastavts.models.avts import AVTS
from fastavts.models.video import VIDEO_NETS


@pytest.mark.parametrize("name,count", [("r2plus1d_18", 31_505_325), ("mc3_18", 11_695_440),
                                        ("r3d_18", 33_371_472)])
def test_parameter_counts_with_a_400_way_classifier(name, count):
    net = VIDEO_NETS[name](num_classes=400)
    assert sum(p.numel() for p in net.parameters()) == count


@pytest.mark.parametrize("name", list(VIDEO_NETS))
def test_video_nets_forward_and_backward(name):
    net = VIDEO_NETS[name]()
    x = torch.randn(2, 3, 8, 40, 40, requires_grad=True)
    y = net(x)
    assert y.shape == (2, net.out_dim)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())


def test_audio_net_and_avts_shapes():
    a = AudioNet((8, 16, 32, 64))
    assert a(torch.randn(3, 1, 64, 128)).shape == (3, 64)
    m = AVTS("tiny", "tiny", dim=32, classifier=True)
    v, e, fv, fa = m(torch.randn(2, 3, 8, 48, 48), torch.randn(5, 1, 64, 128))
    assert v.shape == (2, 32) and e.shape == (5, 32) and fv.shape == (2, 64) and fa.shape == (5, 64)
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)  # normalised embeddings
    assert m.sync_logits(fv, fa[:2]).shape == (2, 2)


@pytest.mark.parametrize("name", ["r2plus1d_18", "mc3_18", "r3d_18"])
def test_torchvision_weights_load_and_give_the_same_outputs(name):
    tv = pytest.importorskip("torchvision.models.video", reason="torchvision does not import "
                             "with the CPU build of torch; runs on the GPU machines")
    ref = getattr(tv, name)(weights=None, num_classes=400).eval()
    ours = VIDEO_NETS[name](num_classes=400).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 3, 8, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name,frames,bins", [("r2plus1d_18", 16, 2), ("mc3_18", 8, 4),
                                              ("r3d_18", 16, 2), ("tiny", 8, 4)])
def test_time_bins_on_every_video_net(name, frames, bins):
    """model.time_bins reaches every video net: the features are the last stage's output
    averaged over space and over each bin of time, computed here from that output with NumPy."""
    net = AVTS(name, "tiny", time_bins=bins).video_net.eval()
    assert net.out_dim == 512 * bins if name != "tiny" else 64 * bins
    seen = {}
    net.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach().numpy()))
    with torch.no_grad():
        got = net(torch.randn(2, 3, frames, 32, 32)).numpy()
    x = seen["x"]                                        # (B, C, T', H', W')
    assert x.shape[2] == net.time_steps(frames)
    bins_of_t = np.array_split(np.arange(x.shape[2]), bins)
    want = np.stack([x[:, :, t].mean(axis=(2, 3, 4)) for t in bins_of_t], -1)  # (B, C, bins)
    np.testing.assert_allclose(got, want.reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_time_bins_beyond_what_a_net_keeps_are_refused():
    pytest.importorskip("omegaconf")   # the GPU check without it runs the rest of this file
    from fastavts.config import ConfigError, build_config

    cfg = build_config(overrides=["model.video=r2plus1d_18", "model.audio=tiny",
                                  "model.time_bins=4", "data.clip_frames=16"])
    with pytest.raises(ConfigError, match=r"model.time_bins=4: r2plus1d_18 keeps 2 time step"):
        AVTS.from_config(cfg)


def test_tiny_stem_stride_4_runs_the_first_stage_at_a_quarter_of_the_side():
    """tiny_stem_stride=4: the stem's spatial convolution strides 4 (the same as a plain
    strided conv3d with its weights), so the first stage sees crop/4 x crop/4, every frame
    kept. (No OmegaConf here: the GPU checks' core part runs this file without it.)"""
    import torch.nn.functional as F

    m = AVTS("tiny", "tiny", dim=32, time_bins=4, tiny_stem_stride=4)
    net = m.video_net
    seen = {}
    net.layer1.register_forward_hook(lambda mod, i, o: seen.update(layer1=o.shape))
    x = torch.randn(2, 3, 8, 32, 32, requires_grad=True)
    want_stem = F.conv3d(x, net.stem[0].weight, stride=(1, 4, 4), padding=(0, 3, 3))
    torch.testing.assert_close(net.stem[0](x), want_stem)
    v, _, fv, _ = m(x, torch.randn(2, 1, 64, 128))
    assert seen["layer1"][-2:] == (8, 8) and seen["layer1"][2] == 8
    assert fv.shape == (2, net.out_dim) and net.out_dim == 64 * 4
    v.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert AVTS("tiny", "tiny").video_net.stem[0].stride == (1, 2, 2)   # default: R(2+1)D's


def test_model_config_reaches_the_stem_stride():
    pytest.importorskip("omegaconf")
    from fastavts.config import build_config

    for s in (2, 4):
        cfg = build_config(overrides=["model.video=tiny", "model.audio=tiny",
                                      f"model.tiny_stem_stride={s}"])
        assert AVTS.from_config(cfg).video_net.stem[0].stride == (1, s, s)
    for st in (1, 2):
        cfg = build_config(overrides=["model.video=tiny", "model.audio=tiny",
                                      f"model.tiny_stem_time_stride={st}"])
        assert AVTS.from_config(cfg).video_net.stem[3].stride == (st, 1, 1)


@pytest.mark.parametrize("frames", [16, 15, 9])
def test_tiny_stem_time_stride_2_halves_the_time_steps_after_the_stem(frames):
    """tiny_stem_time_stride=2: the stem's temporal convolution strides 2 (the same as a plain
    strided conv3d of the stem's spatial output), the stages see ceil(T / 2) steps, and
    time_steps() says so (the time_bins check relies on it)."""
    import torch.nn.functional as F

    m = AVTS("tiny", "tiny", dim=16, tiny_stem_stride=4, tiny_stem_time_stride=2)
    net = m.video_net
    seen = {}
    net.layer1.register_forward_hook(lambda mod, i, o: seen.update(layer1=o.shape))
    net.layer4.register_forward_hook(lambda mod, i, o: seen.update(layer4=o.shape))
    x = torch.randn(2, 3, frames, 32, 32, requires_grad=True)
    mid = net.stem[2](net.stem[1](net.stem[0](x)))
    torch.testing.assert_close(net.stem[3](mid), F.conv3d(mid, net.stem[3].weight,
                                                          stride=(2, 1, 1), padding=(1, 0, 0)))
    v, _, _, _ = m(x, torch.randn(2, 1, 64, 128))
    assert seen["layer1"][2] == seen["layer4"][2] == -(-frames // 2) == net.time_steps(frames)
    v.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert AVTS("tiny", "tiny").video_net.time_steps(frames) == frames   # default: every frame


# cases of FactorConv3d: (in, out, kernel, stride, padding, input T x H x W, bias, fast path)
FACTOR_CASES = [
    (5, 7, (3, 1, 1), (1, 1, 1), (1, 0, 0), (6, 5, 3), False, True),    # tiny's temporal
    (5, 7, (3, 1, 1), (2, 1, 1), (1, 0, 0), (7, 4, 4), True, True),     # R(2+1)D's, strided
    (4, 6, (5, 1, 1), (1, 1, 1), (2, 0, 0), (5, 1, 1), True, True),
    (4, 3, (3, 1, 1), (1, 1, 1), (0, 0, 0), (6, 2, 3), False, True),    # no padding
    (6, 9, (1, 3, 3), (1, 1, 1), (0, 1, 1), (5, 1, 1), False, True),    # 1 x 1 map
    (6, 9, (1, 3, 3), (1, 2, 2), (0, 1, 1), (5, 2, 2), False, True),    # 2 x 2 -> 1 x 1
    (6, 9, (1, 3, 3), (1, 2, 2), (0, 1, 1), (3, 1, 1), True, True),
    (3, 4, (1, 5, 5), (1, 1, 1), (0, 2, 2), (4, 2, 1), False, False),   # 2 x 1 out: plain
    (3, 4, (1, 5, 5), (1, 4, 4), (0, 2, 2), (4, 3, 3), True, True),     # 3 x 3 -> 1 x 1
    (3, 4, (1, 3, 3), (1, 1, 1), (0, 1, 1), (4, 3, 2), False, False),   # ordinary map: plain
    (3, 4, (1, 3, 3), (1, 2, 2), (0, 0, 0), (4, 4, 3), False, False),   # row 3 outside window
    (3, 4, (3, 3, 3), (1, 1, 1), (1, 1, 1), (4, 3, 3), False, False),   # full 3D kernel
]


@pytest.mark.parametrize("case", FACTOR_CASES, ids=[str(i) for i in range(len(FACTOR_CASES))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_factor_conv3d_equals_conv3d_forward_and_backward(case, channels_last):
    """FactorConv3d's 2D shortcuts against F.conv3d in float64: output, and gradients of the
    input, the weight (taps outside the map included: zero) and the bias; the shortcut is
    really taken where it applies (channels-last inputs always take nn.Conv3d's path)."""
    import torch.nn.functional as F

    from fastavts.models.video import FactorConv3d

    cin, cout, k, s, p, (t, h, w), bias, fast = case
    torch.manual_seed(0)
    m = FactorConv3d(cin, cout, k, stride=s, padding=p, bias=bias).double()
    x = torch.randn(3, cin, t, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    w_ref = m.weight.detach().clone().requires_grad_(True)
    b_ref = m.bias.detach().clone().requires_grad_(True) if bias else None
    x_ref = x.detach().clone().requires_grad_(True)
    want = F.conv3d(x_ref, w_ref, b_ref, s, p)
    if fast and not channels_last:
        m._conv_forward = lambda *a: pytest.fail("the 2D shortcut was not taken")
    got = m(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(m.bias.grad, b_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("widths,stem_stride,momentum", [((8, 16, 32, 64), 2, 0.1),
                                                         ((8, 16, 32, 64), 2, None),
                                                         ((6, 10, 12, 14), 1, 0.3)])
def test_audio_net_folded_input_bn_equals_the_plain_bn_then_conv(widths, stem_stride, momentum):
    """AudioNet.forward folds the input BN's affine step into the first convolution; against
    the plain Sequential (input BN -> conv -> ...) in float64 over three training steps and
    then in eval mode: outputs, every parameter's gradient, the running statistics."""
    import copy

    torch.manual_seed(0)
    net = AudioNet(widths, time_bins=2, stem_stride=stem_stride).double()
    net.features[0].momentum = momentum
    with torch.no_grad():   # a BN that is not the identity at the start
        net.features[0].weight.fill_(1.7)
        net.features[0].bias.fill_(-0.4)
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        x = 3.0 * torch.randn(4, 1, 24, 38, dtype=torch.float64) + 5.0
        got = net(x)
        want = ref.pool(ref.features(x)).flatten(1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(want)
        opt.zero_grad()
        opt_ref.zero_grad()
        got.backward(g)
        want.backward(g)
        for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
        opt.step()
        opt_ref.step()
    for (name, b), b_ref in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=name)
    net.eval()
    ref.eval()
    x = torch.randn(2, 1, 24, 38, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref.pool(ref.features(x)).flatten(1), rtol=1e-10,
                               atol=1e-10)
