"""Every weights file that cannot be read gives one line naming the file and what was expected.

``load_state_dict_file``, ``load_torch_checkpoint``, ``load_flax_params`` and ``jaxdiff convert``
on missing, empty, truncated or junk files, a directory, a zip or .npy of something else, and a
``.pt`` without torch. The cases that need torch to build their file skip without it; the rest
run in CI, where torch is not installed.
"""

import io
import re
import sys
import zipfile

import numpy as np
import pytest

from jaxdiff import cli, convert

_PT = "PyTorch checkpoint"
_NPZ = r"\.npz of the reference state_dict"
_MSGPACK = "Flax variables"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _zip(path, member="readme.txt"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, "not weights")
    return path


def _npz_bytes():
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(3, np.float32))
    return buffer.getvalue()


def _npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    return path


# (file maker, the readers to try, what the message must say); none of them needs torch
CASES = {
    "missing.pt": (lambda p: p, "does not exist"),
    "empty.pt": (lambda p: _write(p, b""), r"is empty \(0 bytes\)"),
    "junk.pt": (
        lambda p: _write(p, b"not a checkpoint " * 8),
        "neither a zip archive nor a pickle",
    ),
    "truncated-zip.pt": (lambda p: _write(p, _npz_bytes()[:60]), "truncated or damaged zip"),
    "dir.pt": (lambda p: p.mkdir() or p, "is a directory"),
    "missing.npz": (lambda p: p, "does not exist"),
    "empty.npz": (lambda p: _write(p, b""), "is empty"),
    "junk.npz": (lambda p: _write(p, b"\x00\x01junk" * 40), "cannot read"),
    "truncated.npz": (lambda p: _write(p, _npz_bytes()[:-40]), "cannot read"),
    "array.npz": (_npy, "single .npy array"),
    "dir.npz": (lambda p: p.mkdir() or p, "is a directory"),
    "other-zip.npz": (_zip, "no Unet weights found"),
}


def _expected(name):
    return _NPZ if name.endswith(".npz") else _PT


def _check_one_line(message, path):
    assert "\n" not in message and str(path) in message, message


@pytest.mark.parametrize("name", sorted(CASES))
def test_unreadable_state_dict_files_name_the_file(tmp_path, name):
    make, match = CASES[name]
    path = make(tmp_path / name)
    error_type = FileNotFoundError if "missing" in name else ValueError
    with pytest.raises(error_type, match=match) as info:
        convert.load_state_dict_file(path)
    _check_one_line(str(info.value), path)
    if match != "no Unet weights found":
        assert re.search(_expected(name), str(info.value))
    if name.endswith(".pt"):
        with pytest.raises(error_type, match=match):
            convert.load_torch_checkpoint(path, "tiny")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: _write(p, b""), "is empty"),
        (lambda p: _write(p, b"\xc1\xc1junk"), "cannot read"),
        (lambda p: _write(p, b"\x2a"), "holds a int"),  # msgpack of the number 42
        (lambda p: p.mkdir() or p, "is a directory"),
    ],
    ids=["missing", "empty", "junk", "not-a-dict", "directory"],
)
def test_unreadable_msgpack_files_name_the_file(tmp_path, make, match):
    path = make(tmp_path / "params.msgpack")
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        convert.load_flax_params(path, "tiny")
    _check_one_line(str(info.value), path)
    assert _MSGPACK in str(info.value)


def test_pt_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    for path in (
        _zip(tmp_path / "model.pt", "archive/data.pkl"),
        _write(tmp_path / "old.pt", b"\x80\x02x"),
    ):
        with pytest.raises(ValueError, match=r"needs PyTorch.*pip install torch==") as info:
            convert.load_state_dict_file(path)
        _check_one_line(str(info.value), path)
    with pytest.raises(ValueError, match=r"needs PyTorch.*\.npz instead"):
        convert.save_torch_checkpoint({}, tmp_path / "out.pt", "tiny")


def test_corrupt_pt_files_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    whole = tmp_path / "whole.pt"
    torch.save({"x": torch.zeros(3)}, whole)
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        _write(tmp_path / "truncated.pt", whole.read_bytes()[:-100]): "truncated or damaged zip",
        _write(tmp_path / "cut-legacy.pt", legacy.read_bytes()[:-20]): "cannot read",
        _write(tmp_path / "junk-pickle.pt", b"\x80\x02junkjunk"): "cannot read",
        _zip(tmp_path / "other.pt"): "cannot read",
        whole: "no Unet weights found",
    }
    for path, match in cases.items():
        with pytest.raises(ValueError, match=match) as info:
            convert.load_torch_checkpoint(path, "tiny")
        _check_one_line(str(info.value), path)


@pytest.mark.parametrize("name", ["junk.pt", "empty.pt", "dir.pt", "junk.npz", "missing.pt"])
def test_cli_convert_prints_one_line_and_exits_1(tmp_path, capsys, name):
    src = CASES[name][0](tmp_path / name)
    out = tmp_path / "x.msgpack"
    assert cli.main(["convert", "--config", "tiny", "--in", str(src), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdiff convert: "), captured.err
    assert str(src) in lines[0] and not out.exists()
