"""`load_state_dict` on the checkpoint files researchers hold: training wrappers, DataParallel/compile prefixes,
bfloat16. PyTorch is not a test dependency: `.pth` reading goes
through a stand-in `torch.load` that returns what the real one returns for such files (checked against torch 2.13)."""

import sys
import types
import zipfile

import numpy as np
import pytest

from diffusets_jax.convert import load_state_dict


class _Tensor:
    """What `torch.load` gives: `.detach().cpu().numpy()`; bfloat16's `.numpy()` raises TypeError as torch's does."""

    def __init__(self, value, bfloat16=False):
        self.value, self.bfloat16 = np.asarray(value, np.float32), bfloat16

    def detach(self):
        return self

    def cpu(self):
        return self

    def float(self):
        return _Tensor(self.value)

    def numpy(self):
        if self.bfloat16:
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self.value


@pytest.fixture
def fake_torch(monkeypatch):
    """`torch` whose `load` returns `fake_torch.saved` (set by the test)."""
    torch = types.ModuleType("torch")
    torch.saved = None
    torch.load = lambda path, map_location=None, weights_only=False: torch.saved
    monkeypatch.setitem(sys.modules, "torch", torch)
    return torch


def _zip_pth(path, payload=b"x" * 4096):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # torch.save's layout: stored members
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", payload)


def test_training_wrappers_prefixes_and_bfloat16_are_opened(tmp_path, fake_torch):
    """`{'state_dict': sd, 'epoch': ..}` from a DataParallel + torch.compile fine-tune in bfloat16 used to fail
    with "key 'downsampling_blocks.0.down.weight' is missing" or a TypeError traceback."""
    _zip_pth(tmp_path / "unet_best.pth")
    fake_torch.saved = {"state_dict": {"module._orig_mod.a.weight": _Tensor([1.5, -2.0], bfloat16=True),
                                       "module._orig_mod.b.bias": _Tensor([3.0])}, "epoch": 7}
    sd = load_state_dict(tmp_path / "unet_best.pth")
    assert sorted(sd) == ["a.weight", "b.bias"] and sd["a.weight"].dtype == np.float32
    np.testing.assert_array_equal(sd["a.weight"], [1.5, -2.0])

    fake_torch.saved = {"model": {"encoder": {"module.conv.weight": _Tensor([1.0])},
                                  "decoder": {"module.conv.weight": _Tensor([2.0])}}, "optimizer": {"state": {}}}
    assert sorted(load_state_dict(tmp_path / "unet_best.pth")) == ["decoder.conv.weight", "encoder.conv.weight"]


def test_prefixes_are_dropped_from_dumps_and_a_clash_is_refused(tmp_path):
    np.savez(tmp_path / "vae.npz", **{"encoder.module.conv.weight": np.ones(2), "decoder.module.conv.weight": np.ones(3)})
    assert sorted(load_state_dict(tmp_path / "vae.npz")) == ["decoder.conv.weight", "encoder.conv.weight"]
    np.savez(tmp_path / "both.npz", **{"module.conv.weight": np.ones(2), "conv.weight": np.ones(2)})
    with pytest.raises(ValueError, match="holds 'conv.weight' twice"):
        load_state_dict(tmp_path / "both.npz")

