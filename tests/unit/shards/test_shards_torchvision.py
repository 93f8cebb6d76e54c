"""`diet prepare torchvision`: tiny files in the real formats (idx, gzipped or not, flat or in
torchvision's layout; CIFAR python batches; a Food101 folder), round trip index for index against
the torchvision data set object, and bad input (missing, truncated, unknown, existing output)
refused with nothing half-written. No network; no dependency on Debian's dataset package.

The CIFAR batches written here are pickles that torchvision's CIFAR classes unpickle (they are the
format); the test writes them itself. torchvision's CIFAR classes verify each file against the
md5 they record, so the tests inject a subclass recording the tiny files' checksums."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets as tvd

from diet_engine.launch.cli import main
from diet_engine.storage.shards import Manifest, prepare_torchvision
from diet_engine.storage.shards.records import decode, find_image_field, iter_samples
from diet_engine.storage.shards.torchvision_sets import SETS

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SIZES = {"train": 23, "test": 9}  # shards of 10: 10 + 10 + 3 and 9


# ---------------------------------------------------------------------------------------- tiny files


def _idx(a: np.ndarray) -> bytes:
    """The idx format: magic 0x00 0x00 0x08 (uint8) ndim, big-endian int32 dims, the bytes."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def _write_idx(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny (Fashion-)MNIST idx files, 5×4 images (not square: a transposition would show)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        n = SIZES[split]
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(a), mtime=0))
        else:
            (folder / name).write_bytes(_idx(a))
    return arrays


def _torchvision_layout(arrays: dict[str, np.ndarray], root: Path, cls_name: str) -> Path:
    """The same files, uncompressed, where torchvision looks: the reference data set's root."""
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    for name, a in arrays.items():
        (raw / name).write_bytes(_idx(a))
    return root


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _write_cifar(root: Path, hundred: bool = False, seed: int = 0) -> type:
    """Tiny CIFAR-10 (or -100) python batches; returns a CIFAR class recording their checksums."""
    rng = np.random.default_rng(seed)
    base = tvd.CIFAR100 if hundred else tvd.CIFAR10
    folder = root / base.base_folder
    folder.mkdir(parents=True)
    key, n_classes = ("fine_labels", 100) if hundred else ("labels", 10)
    counts = {f: c for (f, _), c in zip(base.train_list + base.test_list, ([5, 4, 6, 3, 5] if not hundred else [23])
                                        + [SIZES["test"]], strict=True)}
    for f, n in counts.items():
        batch = {"batch_label": f, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: rng.integers(0, n_classes, n).tolist(), "filenames": [f"{f}_{i}.png" for i in range(n)]}
        (folder / f).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"class {i}" for i in range(n_classes)]
    (folder / base.meta["filename"]).write_bytes(pickle.dumps({base.meta["key"]: names}, protocol=2))

    class Tiny(base):  # the real class, recording the checksums of these files instead of the release's
        train_list = [[f, _md5(folder / f)] for f, _ in base.train_list]
        test_list = [[f, _md5(folder / f)] for f, _ in base.test_list]
        meta = dict(base.meta, md5=_md5(folder / base.meta["filename"]))

    return Tiny


def _write_food101(root: Path) -> None:
    """Tiny Food101: meta/{train,test}.json and images/<class>/<id>.jpg; RGB and gray JPEGs (bytes
    kept) and an RGBA PNG under a .jpg name (converted to RGB, stored as PNG)."""
    rng = np.random.default_rng(3)
    base = root / "food-101"
    meta = {"train": {"apple_pie": [], "bibimbap": []}, "test": {"apple_pie": [], "bibimbap": []}}
    for i in range(40):
        cls = ("apple_pie", "bibimbap")[i % 2]
        split = "train" if i < 34 else "test"
        path = base / "images" / cls / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 5 == 3:
            Image.fromarray(rng.integers(0, 256, (7, 9, 4), dtype=np.uint8), "RGBA").save(path, format="PNG")
        elif i % 5 == 4:
            Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8), "L").save(path, format="JPEG")
        else:
            Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(path, format="JPEG")
        meta[split][cls].append(f"{cls}/{i}")
    (base / "meta").mkdir()
    for split, d in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(d))


# ---------------------------------------------------------------------------------------- round trip


def _read_back(m: Manifest) -> list[tuple[int, np.ndarray, int | None]]:
    """(index, pixels (H, W, C), label) of every stored sample, in stored order."""
    out = []
    for path in m.shard_paths():
        for s in iter_samples(path):
            pixels = decode(s[m.image_field or find_image_field(s)], m.channels).permute(1, 2, 0).numpy()
            out.append((int(s["index"]), pixels, int(s["cls"]) if "cls" in s else None))
    return out


def assert_round_trip(m: Manifest, ds) -> None:
    """The shards hold `ds` index for index: pixels of `ds[i][0]` and label `ds[i][1]` at index i."""
    back = _read_back(m)
    assert m.num_samples == len(ds) == len(back)
    assert [i for i, _, _ in back] == list(range(len(ds)))
    for i, pixels, label in back:
        img, target = ds[i]
        want = np.asarray(img)
        np.testing.assert_array_equal(pixels, want[:, :, None] if want.ndim == 2 else want, err_msg=f"index {i}")
        assert label == target, f"index {i}"
    if m.has_labels and hasattr(ds, "classes"):
        assert m.label_names == [str(c) for c in ds.classes]


def _no_output(tmp_path: Path, out: Path, inputs: set[str]) -> None:
    """Nothing half-written: no output, no staging folder beside it."""
    assert not out.exists()
    assert {p.name for p in out.parent.iterdir()} <= inputs, sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize("layout", ["flat-gz", "flat-raw", "torchvision-gz", "torchvision-raw"])
def test_fashion_mnist_idx_round_trip(tmp_path, layout):
    flat = layout.startswith("flat")
    src = tmp_path / "src"
    folder = src if flat else src / "FashionMNIST" / "raw"
    arrays = _write_idx(folder, gz=layout.endswith("gz"))
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    ms = prepare_torchvision("fashion-mnist", src, tmp_path / "out", shard_size=10, progress=False)
    assert sorted(ms) == ["test", "train"]
    ref_root = _torchvision_layout(arrays, tmp_path / "ref", "FashionMNIST")
    for split, m in ms.items():
        m = Manifest.load(tmp_path / "out" / split)  # from disk, validated
        assert [s.num_samples for s in m.shards] == {"train": [10, 10, 3], "test": [9]}[split]
        assert (m.channels, m.image.height, m.image.width, m.image.format) == (1, 5, 4, "png")
        assert m.source["kind"] == "torchvision" and m.source["dataset"] == "FashionMNIST"
        assert m.source["split"] == split and m.source["torchvision_version"]
        assert m.source["layout"] == ("flat folder" if flat else "torchvision (gzipped)" if "gz" in layout
                                      else "torchvision")
        assert m.source["reader"] == "arrays"
        assert m.num_classes == 10 and m.label_names[0] == "T-shirt/top"
        assert_round_trip(m, tvd.FashionMNIST(str(ref_root), train=split == "train"))
        want = arrays[f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"] / 255.0
        assert m.mean[0] == pytest.approx(want.mean(), abs=1e-5) and m.std[0] == pytest.approx(want.std(), abs=1e-5)
    # the user's folder is only read, and the temporary layout is gone
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]
    assert {p.name for p in (tmp_path / "out" / "train").iterdir()} == {"manifest.json"} | {
        f"shard-00000{i}.tar" for i in range(3)}


def test_mnist_one_split_and_names(tmp_path):
    arrays = _write_idx(tmp_path / "src", gz=True, seed=1)
    ms = prepare_torchvision("MNIST", tmp_path / "src", tmp_path / "out", ["test"], progress=False)
    assert list(ms) == ["test"] and not (tmp_path / "out" / "train").exists()
    assert ms["test"].label_names[3] == "3 - three" and ms["test"].shard_size == 1000
    assert ms["test"].split == {"name": "test", "of": "torchvision.datasets.MNIST", "num_samples": SIZES["test"]}
    ref = tvd.MNIST(str(_torchvision_layout(arrays, tmp_path / "ref", "MNIST")), train=False)
    assert_round_trip(Manifest.load(tmp_path / "out" / "test"), ref)


def test_getitem_fallback_when_the_arrays_disagree(tmp_path):
    """A class whose `data` is not what `ds[i]` returns (here: transposed images) is read through `ds[i]`."""

    class TransposedFashionMNIST(tvd.FashionMNIST):
        def __getitem__(self, i):
            img, target = super().__getitem__(i)
            return img.transpose(Image.Transpose.TRANSPOSE), target

    arrays = _write_idx(tmp_path / "src", gz=False, seed=2)
    prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", shard_size=10, progress=False,
                        dataset_class=TransposedFashionMNIST)
    ref = TransposedFashionMNIST(str(_torchvision_layout(arrays, tmp_path / "ref", "TransposedFashionMNIST")))
    m = Manifest.load(tmp_path / "out" / "train")
    assert m.source["reader"] == "getitem" and (m.image.height, m.image.width) == (4, 5)
    assert_round_trip(m, ref)


@pytest.mark.parametrize("hundred", [False, True], ids=["CIFAR10", "CIFAR100"])
def test_cifar_batches_round_trip(tmp_path, hundred):
    cls = _write_cifar(tmp_path / "src", hundred)
    name = "cifar-100" if hundred else "CIFAR10"
    ms = prepare_torchvision(name, tmp_path / "src", tmp_path / "out", shard_size=10, progress=False,
                             dataset_class=cls)
    for split, m in ms.items():
        m = Manifest.load(tmp_path / "out" / split)
        assert m.num_samples == SIZES[split] and (m.channels, m.image.height, m.image.width) == (3, 32, 32)
        assert m.num_classes == (100 if hundred else 10) and m.source["reader"] == "arrays"
        assert_round_trip(m, cls(str(tmp_path / "src"), train=split == "train"))


def test_svhn_mat_round_trip(tmp_path):
    """SVHN: .mat files (N, 3, H, W after torchvision's transpose), label 10 → 0, no `.classes`."""
    from scipy.io import savemat

    rng = np.random.default_rng(4)
    sums = {}
    for split, n in SIZES.items():
        f = tmp_path / "src" / tvd.SVHN.split_list[split][1]
        f.parent.mkdir(exist_ok=True)
        savemat(f, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                    "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
        sums[split] = _md5(f)

    class TinySVHN(tvd.SVHN):
        split_list = {k: [url, name, sums.get(k, md5)] for k, (url, name, md5) in tvd.SVHN.split_list.items()}

    ms = prepare_torchvision("SVHN", tmp_path / "src", tmp_path / "out", shard_size=10, progress=False,
                             dataset_class=TinySVHN)
    for split, m in ms.items():
        m = Manifest.load(tmp_path / "out" / split)
        assert m.source["reader"] == "arrays" and m.label_names == [str(i) for i in range(10)]
        assert_round_trip(m, TinySVHN(str(tmp_path / "src"), split=split))


def test_image_file_data_set_round_trip(tmp_path):
    """Food101 (paths + labels): JPEG bytes kept, an RGBA file stored as the PNG of its RGB conversion."""
    _write_food101(tmp_path / "src")
    ms = prepare_torchvision("Food101", tmp_path / "src", tmp_path / "out", shard_size=10, workers=2,
                             progress=False)
    m = Manifest.load(tmp_path / "out" / "train")
    assert m.source["reader"] == "files" and m.num_samples == 34 and m.image.format == "mixed"
    assert not m.image.uniform_size and ms["test"].num_samples == 6
    assert_round_trip(m, tvd.Food101(str(tmp_path / "src"), split="train"))
    assert_round_trip(Manifest.load(tmp_path / "out" / "test"), tvd.Food101(str(tmp_path / "src"), split="test"))
    stored = [s for p in m.shard_paths() for s in iter_samples(p)]
    src = tvd.Food101(str(tmp_path / "src"), split="train")._image_files
    kinds = set()
    for sample, path in zip(stored, src, strict=True):
        raw = path.read_bytes()
        if raw.startswith(b"\x89PNG"):  # the RGBA PNG: stored as the PNG of its RGB conversion
            assert "jpg" not in sample and Image.open(path).mode == "RGBA"
            assert Image.open(io.BytesIO(sample["png"])).mode == "RGB"
        else:  # a JPEG (RGB or gray): its bytes, untouched
            assert sample["jpg"] == raw
        kinds.add(Image.open(path).mode)
    assert kinds == {"RGB", "L", "RGBA"}


# ---------------------------------------------------------------------------------------- bad input


def test_missing_idx_file_names_it_and_the_folder(tmp_path):
    _write_idx(tmp_path / "src", gz=True)
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path / "src") in msg and "FashionMNIST/raw" in msg
    assert "train-images" not in msg and "--download" in msg
    _no_output(tmp_path, tmp_path / "out", {"src"})


def test_missing_cifar_file_names_it(tmp_path):
    cls = _write_cifar(tmp_path / "src")
    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_4") as e:
        prepare_torchvision("CIFAR10", tmp_path / "src", tmp_path / "out", dataset_class=cls, progress=False)
    assert str(tmp_path / "src") in str(e.value) and "data_batch_3" not in str(e.value)
    _no_output(tmp_path, tmp_path / "out", {"src"})


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_idx_file_is_named(tmp_path, gz):
    _write_idx(tmp_path / "src", gz=gz)
    bad = tmp_path / "src" / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(ValueError, match="truncated") as e:
        prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", progress=False)
    assert str(bad) in str(e.value)
    _no_output(tmp_path, tmp_path / "out", {"src"})


def test_truncated_idx_in_the_second_split_leaves_nothing(tmp_path):
    """The train split is written first and complete; the test split's bad file still leaves no output."""
    _write_idx(tmp_path / "src", gz=False)
    bad = tmp_path / "src" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", ["train", "test"], progress=False)
    _no_output(tmp_path, tmp_path / "out", {"src"})


def test_truncated_cifar_batch_is_named(tmp_path):
    cls = _write_cifar(tmp_path / "src")
    bad = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ValueError, match="data_batch_3") as e:
        prepare_torchvision("CIFAR10", tmp_path / "src", tmp_path / "out", dataset_class=cls, progress=False)
    assert "data_batch_2" not in str(e.value)
    _no_output(tmp_path, tmp_path / "out", {"src"})


def test_mismatched_image_and_label_files_are_refused(tmp_path):
    arrays = _write_idx(tmp_path / "src", gz=False)
    (tmp_path / "src" / "t10k-labels-idx1-ubyte").write_bytes(_idx(arrays["train-labels-idx1-ubyte"]))
    with pytest.raises(ValueError, match="labels"):
        prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", progress=False)
    _no_output(tmp_path, tmp_path / "out", {"src"})


def test_unknown_name_split_or_variant(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="unknown torchvision data set 'ImageNet22k'.*FashionMNIST.*CIFAR10"):
        prepare_torchvision("ImageNet22k", tmp_path / "src", tmp_path / "out")
    with pytest.raises(ValueError, match="no split 'val'.*train, test"):
        prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", ["val"])
    with pytest.raises(ValueError, match="needs --variant.*balanced"):
        prepare_torchvision("EMNIST", tmp_path / "src", tmp_path / "out")
    with pytest.raises(ValueError, match="takes no --variant"):
        prepare_torchvision("CIFAR10", tmp_path / "src", tmp_path / "out", variant="x")
    with pytest.raises(ValueError, match="cannot download ImageNet"):
        prepare_torchvision("ImageNet", tmp_path / "src", tmp_path / "out", download=True)
    _no_output(tmp_path, tmp_path / "out", {"src"})


def test_existing_output_refused_unless_overwrite(tmp_path):
    _write_idx(tmp_path / "src", gz=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}
    prepare_torchvision("FashionMNIST", tmp_path / "src", tmp_path / "out", overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]


def test_cli_writes_splits_and_names_the_dataset_in_errors(tmp_path, capsys):
    _write_idx(tmp_path / "src", gz=True)
    assert main(["prepare", "torchvision", "FashionMNIST", "--root", str(tmp_path / "src"), "--out",
                 str(tmp_path / "out"), "--split", "train,test", "--shard-size", "10"]) == 0
    printed = capsys.readouterr().out
    assert "(train): 23 samples in 3 shards" in printed and "(test): 9 samples in 1 shards" in printed
    assert main(["prepare", "torchvision", "nope", "--root", str(tmp_path / "src"), "--out",
                 str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "diet prepare: error:" in err and "FashionMNIST" in err and "Traceback" not in err


def test_cli_list_matches_the_registry():
    from diet_engine.launch.prepare import TORCHVISION_SETS

    assert tuple(SETS) == TORCHVISION_SETS


def test_flat_and_torchvision_layouts_give_identical_shards(tmp_path):
    """Same idx bytes, two layouts: byte-identical tars."""
    arrays = _write_idx(tmp_path / "flat", gz=True)
    _torchvision_layout(arrays, tmp_path / "tv", "FashionMNIST")
    prepare_torchvision("FashionMNIST", tmp_path / "flat", tmp_path / "a", progress=False)
    prepare_torchvision("FashionMNIST", tmp_path / "tv", tmp_path / "b", progress=False)
    for split in ("train", "test"):
        for p in sorted((tmp_path / "a" / split).glob("*.tar")):
            assert p.read_bytes() == (tmp_path / "b" / split / p.name).read_bytes()
    shutil.rmtree(tmp_path / "a")


def test_training_config_prepares_missing_shards_from_idx_files(tmp_path):
    """`data.prepare_torchvision=NAME:ROOT` (the fashion-mnist preset): missing shards are written on
    first use, then read as they are."""
    from diet_engine.engine.config import RunConfig
    from diet_engine.engine.data import load_manifest

    arrays = _write_idx(tmp_path / "flat", gz=True)
    cfg = RunConfig()
    cfg.data.manifest = str(tmp_path / "fm" / "train")
    cfg.data.prepare_torchvision = f"FashionMNIST:{tmp_path / 'flat'}"
    m = load_manifest(cfg.data)
    assert m.num_samples == len(arrays["train-labels-idx1-ubyte"]) and (tmp_path / "fm" / "test").is_dir()
    assert load_manifest(cfg.data).num_samples == m.num_samples
    cfg.data.prepare_torchvision = "FashionMNIST"
    cfg.data.manifest = str(tmp_path / "other" / "train")
    with pytest.raises(ValueError, match="NAME:ROOT"):
        load_manifest(cfg.data)
