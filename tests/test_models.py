"""Networks: parameter counts of Tran et al.'s definitions, shapes, torchvision's layout."""
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
