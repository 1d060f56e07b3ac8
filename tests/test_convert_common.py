"""`load_state_dict` on the checkpoint files researchers hold: training wrappers, DataParallel/compile prefixes,
bfloat16, the legacy pickle format, damaged archives. PyTorch is not a test dependency: `.pth` reading goes
through a stand-in `torch.load` that returns what the real one returns for such files (checked against torch 2.13)."""

import sys
import types
import zipfile

import numpy as np
import pytest

from diffusets_jax.cli import main
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


def test_a_legacy_pickle_checkpoint_is_read(tmp_path, fake_torch):
    """`torch.save(..., _use_new_zipfile_serialization=False)` (and torch < 1.6) write a bare pickle: it was
    refused as "not a zip archive: is the download complete?" though torch.load reads it."""
    (tmp_path / "unet_all.pth").write_bytes(b"\x80\x02\x8a\x0alp\xfc\x9cF\xf9 j\xa8P\x19.")
    fake_torch.saved = {"w": _Tensor([1.0])}
    assert list(load_state_dict(tmp_path / "unet_all.pth")) == ["w"]


def test_a_checkpoint_damaged_in_place_is_refused(tmp_path, fake_torch, capsys):
    """torch.load does not check the archive's CRC-32s: a file with a zeroed block converted with rc 0 into a
    model with wrong weights. Now one line, exit 2, and no model directory."""
    _zip_pth(tmp_path / "unet_all.pth")
    data = bytearray((tmp_path / "unet_all.pth").read_bytes())
    start = data.index(b"x" * 4096)
    data[start + 1000:start + 2000] = bytes(1000)
    (tmp_path / "unet_all.pth").write_bytes(bytes(data))
    fake_torch.saved = {"w": _Tensor([1.0])}
    out = tmp_path / "models"
    assert main(["convert", "--unet", str(tmp_path / "unet_all.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged (BadZipFile: Bad CRC-32 for file 'archive/data/0')" in err[0]
    assert not out.exists()


def test_a_checkpoint_pickling_more_than_tensors_says_so(tmp_path, fake_torch, capsys):
    """`{'state_dict': sd, 'args': argparse.Namespace(..)}` is refused by weights_only=True; the user saw torch's
    1,197-character advice (with terminal escapes) ending "is the download complete?"."""
    import pickle

    def load(path, map_location=None, weights_only=False):
        raise pickle.UnpicklingError(
            "Weights only load failed. This file can still be loaded, ... WeightsUnpickler error: Unsupported "
            "global: GLOBAL argparse.Namespace was not an allowed global by default. Please use ...")

    fake_torch.load = load
    _zip_pth(tmp_path / "unet_best.pth")
    assert main(["convert", "--unet", str(tmp_path / "unet_best.pth"), "--out", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds Python objects besides tensors (argparse.Namespace)" in err and "download" not in err


def test_a_bfloat16_npz_is_one_line_not_a_traceback():
    """ml_dtypes bfloat16 arrays written with numpy.savez come back as raw `|V2`: np.isfinite raised TypeError."""
    import ml_dtypes

    from diffusets_jax.convert.common import check_weight

    value = np.ones(3, ml_dtypes.bfloat16).view("V2")
    with pytest.raises(ValueError, match=r"'w' holds \|V2 values, not numbers \(numpy.savez keeps no bfloat16"):
        check_weight("U-Net checkpoint", "w", value, (3,), lambda x: x)
    check_weight("U-Net checkpoint", "w", np.ones(3, ml_dtypes.bfloat16), (3,), lambda x: x)  # safetensors' own


def test_a_lightning_checkpoint_converts_without_its_attribute_prefix(tmp_path, fake_torch, capsys):
    """A PyTorch Lightning `.ckpt` keeps the network under the LightningModule attribute holding it:
    `{'state_dict': {'model.encoder.0.weight': ..}, 'epoch': ..}`. `convert` refused it with the missing-key line
    ("VAE checkpoint: every key must start with 'encoder.' or 'decoder.'")."""
    import jax

    from diffusets_jax.convert import vae_from_torch, vae_to_torch
    from tests.helpers.tiny_models import tiny_vae_unet

    vae, vae_vars, _, _ = tiny_vae_unet()
    flat = vae_to_torch(vae_vars, groups=vae.groups)
    _zip_pth(tmp_path / "vae-epoch=3.ckpt")
    fake_torch.saved = {"state_dict": {f"model.{key}": _Tensor(value) for key, value in flat.items()}, "epoch": 3}
    module, variables = vae_from_torch(load_state_dict(tmp_path / "vae-epoch=3.ckpt"), groups=vae.groups)
    assert module == vae
    jax.tree.map(np.testing.assert_array_equal, variables, vae_from_torch(flat, groups=vae.groups)[1])
    # Only a prefix that leaves exactly the architecture's keys: one key short, the line names the keys as stored.
    with pytest.raises(ValueError, match=r"every key must start with 'encoder.' or 'decoder.' .* model\.decoder"):
        vae_from_torch({f"model.{key}": value for key, value in flat.items() if key != "decoder.0.weight"},
                       groups=vae.groups)
    # A prefixed checkpoint's other faults are its own, not a missing-key line.
    broken = {f"net.{key}": value for key, value in flat.items()}
    broken["net.encoder.0.weight"] = broken["net.encoder.0.weight"] * np.nan
    with pytest.raises(ValueError, match="'0.weight' holds NaN or inf values"):
        vae_from_torch(broken, groups=vae.groups)


def test_an_npz_of_a_nested_dict_says_how_to_save_it_flat(tmp_path):
    """`numpy.savez(**torch.load('vae_model.pth'))` pickles its two halves into object arrays: the refusal read
    "is not a readable .npz (ValueError: Object arrays cannot be loaded ...): is the file complete? Write it again
    with numpy.savez", which the user had just done."""
    half = {"0.weight": np.zeros((4, 12, 3), np.float32)}
    np.savez(tmp_path / "vae_model.npz", encoder=np.array(half, dtype=object), decoder=np.array(half, dtype=object))
    with pytest.raises(ValueError) as err:
        load_state_dict(tmp_path / "vae_model.npz")
    message = str(err.value)
    assert "'encoder' holds Python objects" in message and "f'{half}.{k}'" in message
    assert "is the file complete" not in message
    np.savez(tmp_path / "flat.npz", **{f"encoder.{k}": v for k, v in half.items()})
    assert set(load_state_dict(tmp_path / "flat.npz")) == {"encoder.0.weight"}
