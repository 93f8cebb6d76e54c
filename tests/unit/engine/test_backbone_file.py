"""`load_backbone` / `diet eval` on exported backbone files that are damaged or of another
architecture: one `diet eval: error:` line naming the file, exit status 2, no traceback."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from diet_engine.engine.checkpoint import load_backbone
from diet_engine.engine.model import build_backbone
from diet_engine.launch.cli import main


def _export(path, name="resnet18", claims=None):
    net, _ = build_backbone(name, small_stem=True, in_channels=1)
    meta = {"backbone": claims or name, "small_stem": "true", "in_channels": "1", "image_size": "8"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def test_a_good_file_loads(tmp_path):
    net = load_backbone(_export(tmp_path / "b.safetensors"))
    assert sum(p.numel() for p in net.parameters()) > 1e6


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "another architecture", "bad metadata"])
def test_bad_backbone_files_are_clear_errors(tmp_path, capsys, damage):
    f = tmp_path / "b.safetensors"
    if damage == "another architecture":
        _export(f, "resnet18", claims="resnet34")
    elif damage == "bad metadata":
        net, _ = build_backbone("resnet18", small_stem=True, in_channels=1)
        save_file(dict(net.state_dict()), str(f), metadata={"backbone": "resnet18", "in_channels": "one"})
    else:
        _export(f)
        raw = f.read_bytes()
        f.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00\xff" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError, match=str(f)):
        load_backbone(f)
    rc = main(["eval", "--backbone", str(f), "--train", str(tmp_path), "--test", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("diet eval: error:") and str(f) in err and "Traceback" not in err
