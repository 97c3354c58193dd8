"""The image input paths: tensor decode (data.decode=tensor, the default) against PIL (data.decode=pil), the
in-place MixUp/CutMix, and the prepared copy (python -m dtrain.prepare_images)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dtrain.config import load_config
from dtrain.data import seeded
from dtrain.workloads import image, image_device
from dtrain.workloads.image_io import read_rgb_tensor
from helpers import ROOT, subprocess_env

V2 = ROOT / "configs" / "image" / "resnet50_v2.yaml"


def photo(height: int = 75, width: int = 100, seed: int = 0) -> Image.Image:
    """Smooth random content (compresses like a photograph): JPEG artefacts stay small."""
    coarse = torch.rand(3, 6, 8, generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bicubic")[0].clamp(0, 1)
    return Image.fromarray((fine * 255).byte().permute(1, 2, 0).numpy())


def write(path, picture: Image.Image, fmt: str = "JPEG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, fmt, **kw)
    return path


def v2_recipe(decode: str, **overrides):
    return load_config(str(V2), [f"data.decode={decode}", "data.train_crop_size=48", "data.image_size=56",
                                 "data.val_resize_size=64", *[f"data.{k}={v}" for k, v in overrides.items()]]).data


# ---------------------------------------------------------------------------------------------
# Reading files


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_files_decode_to_the_pixels_pil_gives(tmp_path, mode):
    path = write(tmp_path / "a.jpg", photo().convert(mode), quality=90)
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_rgb_tensor(str(path)), expected)


def test_other_files_read_as_the_pil_path_reads_them(tmp_path):
    sixteen_bit = tmp_path / "deep.png"
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(sixteen_bit)
    palette = write(tmp_path / "p.png", photo().convert("P"), "PNG")
    for path in (sixteen_bit, palette):
        expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(read_rgb_tensor(str(path)), expected), path.name


def test_unreadable_files_raise_what_pil_raises_so_they_are_skipped_or_stop_the_run(tmp_path):
    good = write(tmp_path / "train" / "a" / "good.jpg", photo())
    truncated = tmp_path / "train" / "a" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "train" / "a" / "text.jpg").write_bytes(b"not an image at all")
    folder = image.SafeImageFolder(str(tmp_path / "train"), transform=image.val_transform(v2_recipe("tensor")),
                                   loader=read_rgb_tensor)
    results = {os.path.basename(path): folder[i] for i, (path, _) in enumerate(folder.samples)}
    assert results["good.jpg"][0].shape == (3, 56, 56)
    for name in ("truncated.jpg", "text.jpg"):
        picture, (path, reason) = results[name]
        assert picture is None and path.endswith(name)
        with pytest.raises(OSError) as pil_error:
            Image.open(path).convert("RGB")
        assert type(pil_error.value).__name__ in reason  # the same error the PIL path reports


# ---------------------------------------------------------------------------------------------
# Same seeds, same draws, close pixels


def transformed(decode: str, picture: Image.Image, seed: int, **overrides):
    transform = image.train_transform(v2_recipe(decode, **overrides))
    source = picture if decode == "pil" else torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    with seeded(seed):
        out = transform(source)
        state = torch.get_rng_state()
    # The tensor path hands uint8 crops to collation, which normalises and erases the batch.
    return image.collate_skipping_bad([(out, 0)])[0][0], state


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "none"])
def test_pil_and_tensor_paths_draw_the_same_crop_flip_and_op_and_give_close_pixels(policy):
    picture = photo(150, 200)
    close, far = [], []
    for seed in range(12):
        a, state_a = transformed("pil", picture, seed, auto_augment=policy, random_erase=0.0)
        b, state_b = transformed("tensor", picture, seed, auto_augment=policy, random_erase=0.0)
        assert torch.equal(state_a, state_b), seed  # the same number of draws: the same ops were chosen
        assert a.shape == b.shape == (3, 48, 48) and a.dtype == b.dtype == torch.float32
        close.append((a - b).abs().mean().item())
        far.append((a - transformed("tensor", picture, seed + 100, auto_augment=policy, random_erase=0.0)[0])
                   .abs().mean().item())
    # Resampling differs between PIL's and torch's antialiased kernels by about one grey level (1/255 / 0.225
    # = 0.017 normalised); another seed's crop differs by far more.
    assert max(close) < 0.05, close
    assert min(far) > 4 * max(close), (close, far)


def test_random_erasing_draws_the_same_rectangle_on_both_paths():
    picture = photo(150, 200)
    for seed in range(6):
        a, _ = transformed("pil", picture, seed, random_erase=1.0)
        b, _ = transformed("tensor", picture, seed, random_erase=1.0)
        assert torch.equal(a == 0, b == 0)  # the erased rectangle (zeros after normalisation) is the same


def per_sample_and_batched(picture: Image.Image, seeds: range, **overrides):
    """The tensor path's crops normalised and erased one by one (NormalizedFloat, v2.RandomErasing: how the path
    worked before it batched them) and as collation does it, each sample under its own seed."""
    steps = image.train_transform(v2_recipe("tensor", **overrides)).transforms
    assert isinstance(steps[-1], image.ErasedLater)
    one_by_one = v2.Compose([*steps[:-1], image.NormalizedFloat(), v2.RandomErasing(p=overrides["random_erase"])])
    pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    alone, crops = [], []
    for seed in seeds:
        with seeded(seed):
            alone.append(one_by_one(pixels))
            state_alone = torch.get_rng_state()
        with seeded(seed):
            crops.append((v2.Compose(steps)(pixels), seed % 3))
            assert torch.equal(torch.get_rng_state(), state_alone), seed  # the same draws, in the same order
    images, targets, bad = image.collate_skipping_bad(crops)
    assert targets.tolist() == [seed % 3 for seed in seeds] and bad == []
    return torch.stack(alone), images


@pytest.mark.parametrize("policy", ["ta_wide", "none"])
def test_batch_normalisation_and_erasing_equal_the_per_sample_steps(policy):
    alone, batched = per_sample_and_batched(photo(150, 200), range(10), auto_augment=policy, random_erase=0.5)
    assert batched.dtype == torch.float32 and batched.shape == alone.shape == (10, 3, 48, 48)
    assert batched.is_contiguous()
    assert torch.allclose(batched, alone, atol=1e-5)
    erased = alone == 0
    assert torch.equal(batched == 0, erased)  # the same rectangles, filled with exactly 0
    per_sample = erased.flatten(1).any(dim=1)
    assert 0 < int(per_sample.sum()) < 10  # p=0.5: some samples erased, some not


def test_v2_batches_are_the_same_with_and_without_loader_workers(tiny_jpegs):
    """The uint8 crops travel from worker processes to collation; MixUp/CutMix runs there too."""
    from dtrain.build import build_loaders
    from dtrain.dist import DistEnv
    from dtrain.workloads import build_task

    batches = []
    for workers in (0, 1):
        cfg = load_config(str(V2), [f"data.root={tiny_jpegs}", "batch_size=4", f"num_workers={workers}",
                                    "data.train_crop_size=24", "data.random_erase=0.5"])
        env = DistEnv(mode="single", device=torch.device("cpu"))
        loader, sampler, _ = build_loaders(cfg, env, build_task(cfg, env))
        sampler.start_epoch(0)
        batches.append(list(loader)[:3])
    for (images, targets, bad), (images_w, targets_w, bad_w) in zip(*batches):
        assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32 and targets.shape == (4, 3)
        assert torch.equal(images, images_w) and torch.equal(targets, targets_w) and bad == bad_w == []


def test_planes_of_a_pil_image_are_its_pixels():
    picture = photo()
    expected = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    for source in (picture, picture.convert("L"), picture.convert("P")):
        want = torch.from_numpy(np.array(source.convert("RGB"))).permute(2, 0, 1)
        got = image.planes(source)
        assert got.is_contiguous() and got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(image.planes(picture), expected)


def test_normalized_float_equals_torchvisions_steps():
    picture = photo()
    reference = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(image.IMAGENET_MEAN, image.IMAGENET_STD)])(picture)
    pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    for source in (picture, pixels, pixels.contiguous()):
        assert torch.allclose(image.NormalizedFloat()(source), reference, atol=1e-5)
    assert np.array_equal(np.array(image.as_pil(pixels)), np.array(picture))


# ---------------------------------------------------------------------------------------------
# MixUp / CutMix in place


def test_mix_in_place_draws_and_mixes_as_torchvisions_random_choice():
    choices = [v2.MixUp(alpha=0.2, num_classes=5), v2.CutMix(alpha=1.0, num_classes=5)]
    kinds = set()
    for seed in range(12):
        images, targets = torch.randn(6, 3, 20, 24), torch.randint(5, (6,))
        with seeded(seed):
            expected_images, expected_targets = v2.RandomChoice(choices)(images.clone(), targets)
        with seeded(seed):
            got_images, got_targets = image.mix_in_place(choices, images.clone(), targets, 5)
        assert torch.equal(got_targets, expected_targets)
        assert torch.allclose(got_images, expected_images, atol=1e-6)
        kinds.add(torch.equal(got_images, expected_images))  # CutMix: equal; MixUp: within rounding
    assert kinds == {True, False}  # both were drawn


def test_mixup_with_the_previous_sample_equals_roll_and_lerp_bit_for_bit():
    for n in (1, 2, 5):
        images = torch.randn(n, 3, 7, 9)
        expected = images.clone().lerp_(images.roll(1, 0), 0.3)
        image.mix_with_previous(images, 0.3)
        assert torch.equal(images, expected), n


# ---------------------------------------------------------------------------------------------
# The prepared copy


def prepare(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtrain.prepare_images", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT)


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(3):
                write(src / split / c / f"{i}.jpg", photo(300, 400, seed=i), quality=95)
    write(src / "train" / "a" / "gray.png", photo(120, 90).convert("L"), "PNG")
    (src / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return src


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.slow
def test_prepare_writes_a_resized_copy_lists_unreadable_files_and_never_touches_src(source, tmp_path):
    before = listing(source)
    proc = prepare(source, tmp_path / "dst", "--short-side", 64, "--quality", 90, "--workers", 2)
    assert proc.returncode == 0, proc.stderr
    assert listing(source) == before
    written = sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*.jpg"))
    assert len(written) == 13 and "train/a/gray.jpg" in written and "train/b/broken.jpg" not in written
    assert Image.open(tmp_path / "dst" / "train" / "a" / "0.jpg").size == (85, 64)  # 400x300 -> short side 64
    assert Image.open(tmp_path / "dst" / "train" / "a" / "gray.jpg").size == (64, 85)
    assert "unreadable (not copied):" in proc.stdout and "broken.jpg" in proc.stdout
    assert "13 written, 0 already there, 1 unreadable" in proc.stdout


@pytest.mark.slow
def test_prepare_is_idempotent_and_finishes_an_interrupted_run(source, tmp_path):
    dst = tmp_path / "dst"
    assert prepare(source, dst, "--short-side", 64).returncode == 0
    first = listing(dst)
    again = prepare(source, dst, "--short-side", 64)
    assert again.returncode == 0 and "0 written, 13 already there" in again.stdout
    assert listing(dst) == first  # nothing rewritten
    # An interrupted run: some images missing, one half-written temporary file left behind.
    (dst / "train" / "b" / "1.jpg").unlink()
    (dst / "val" / "a" / "2.jpg").unlink()
    (dst / "val" / "a" / ".2.jpg.999.tmp").write_bytes(b"\xff\xd8 half")
    resumed = prepare(source, dst, "--short-side", 64)
    assert resumed.returncode == 0 and "2 written, 11 already there" in resumed.stdout
    assert not list(dst.rglob("*.tmp"))
    assert sorted(name for name, _ in listing(dst)) == sorted(name for name, _ in first)


@pytest.mark.parametrize("args, needle", [
    (["{tmp}/missing", "{tmp}/dst", "--short-side", "64"], "is not a folder"),
    (["{src}", "{src}/copy", "--short-side", "64"], "inside SRC"),
    (["{src}", "{src}", "--short-side", "64"], "inside SRC"),
    (["{src}/train", "{src}", "--short-side", "64"], "inside DST"),
    (["{src}", "{tmp}/dst", "--short-side", "0"], "--short-side must be >= 1"),
    (["{src}", "{tmp}/dst", "--short-side", "64", "--quality", "101"], "--quality must be 1-100"),
])
@pytest.mark.slow
def test_prepare_bad_arguments_are_one_line_and_exit_2(source, tmp_path, args, needle):
    before = listing(source)
    proc = prepare(*[a.format(tmp=tmp_path, src=source) for a in args])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert listing(source) == before


# ---------------------------------------------------------------------------------------------
# data.decode=gpu, its device code run on the CPU


def on_device(planned: list, data, device=torch.device("cpu")):
    """What the training process makes of the workers' samples (DeviceImages, as image.device_images uses it)."""
    policy = image.train_policy(data) if data.auto_augment != "none" else None
    transform = image_device.DeviceImages(data, data.train_crop_size or data.image_size, device, policy,
                                          image.IMAGENET_MEAN, image.IMAGENET_STD)
    return transform(image_device.EncodedBatch.of(planned))


def drawn(path, seed: int, **overrides):
    data = v2_recipe("gpu", **overrides)
    drawer = image_device.PlanDrawer(data, 48, image.ErasedLater(data.random_erase).draw_erasing)
    with seeded(seed):
        planned = drawer(image_device.read_encoded(str(path)))
        state = torch.get_rng_state()
    images, kept, bad = on_device([planned], data)
    assert kept == [0] and bad == []
    return images[0], state, planned.plan


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet", "none"])
def test_gpu_code_path_draws_as_the_cpu_paths_and_gives_their_pixels(tmp_path, policy):
    """The same seed, the same crop box, flip, policy operations and erased rectangle: the worker's draws leave
    torch's generator where the CPU paths leave it. Without a policy the pixels are the tensor path's bit for
    bit (the same torchvision kernels on the same uint8 pixels); a policy operation runs on a tensor here and
    on a PIL image on the tensor path (PIL's kernels are faster on the CPU), within the PIL-vs-tensor tolerance
    of the test above."""
    path = write(tmp_path / "a.jpg", photo(150, 200), quality=90)
    picture = Image.open(path).convert("RGB")
    erased = operations = 0
    for seed in range(10):
        gpu, state, plan = drawn(path, seed, auto_augment=policy, random_erase=0.5)
        tensor, state_tensor = transformed("tensor", picture, seed, auto_augment=policy, random_erase=0.5)
        pil, state_pil = transformed("pil", picture, seed, auto_augment=policy, random_erase=0.5)
        assert torch.equal(state, state_tensor) and torch.equal(state, state_pil), seed
        assert torch.equal(gpu == 0, tensor == 0), seed  # the same erased rectangle (and nothing else exactly 0)
        erased, operations = erased + (plan.erase is not None), operations + len(plan.ops)
        if policy == "none":
            assert torch.equal(gpu, tensor), seed
        assert (gpu - tensor).abs().mean() < 0.05 and (gpu - pil).abs().mean() < 0.05, seed
    assert 0 < erased < 10
    assert (operations > 0) == (policy != "none")  # AutoAugment's operations apply with a probability each


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_batched_policy_operations_equal_torchvisions_kernel_per_sample(policy):
    """DeviceImages applies each turn of operations to a batch at once: per (operation, magnitude) group with
    torchvision's kernel, the geometric ones in one grid_sample with a matrix per sample. Every operation of the
    policy's space at several magnitudes, two turns (RandAugment's two operations), against torchvision's kernel
    applied to each sample alone."""
    data = v2_recipe("gpu", auto_augment=policy)
    kernels = image.train_policy(data)
    device_images = image_device.DeviceImages(data, 48, torch.device("cpu"), kernels, image.IMAGENET_MEAN,
                                              image.IMAGENET_STD)
    space = kernels._AUGMENTATION_SPACE
    names = list(space)

    def operation(name: str, bin_: int, sign: int) -> tuple[str, float]:
        magnitudes, signed = space[name]
        values = magnitudes(31, 48, 48)
        return name, (0.0 if values is None or values.ndim == 0 else float(values[bin_]) * (sign if signed else 1))

    ops = []
    for k, name in enumerate(names):
        for bin_, sign in ((3, 1), (17, -1), (30, 1), (17, -1)):  # (17, -1) twice: a group of two samples
            ops.append([operation(name, bin_, sign), operation(names[(k + bin_) % len(names)], 30 - bin_, -sign)])
    ops[1] = ops[1][:1]  # a sample with one operation only: the second turn leaves it alone
    crops = torch.stack([torch.from_numpy(np.array(photo(48, 48, seed=s))).permute(2, 0, 1) for s in range(len(ops))])
    batched = device_images.apply_operations(crops.clone(), ops)
    for row, sample_ops in enumerate(ops):
        alone = crops[row]
        for name, magnitude in sample_ops:
            alone = kernels._apply_image_or_video_transform(alone, name, magnitude, interpolation=kernels.interpolation,
                                                            fill=kernels._fill)
        assert torch.equal(batched[row], alone), (row, sample_ops)
    assert not torch.equal(batched, crops)


def test_gpu_code_path_validation_equals_the_tensor_paths(tmp_path):
    path = write(tmp_path / "a.jpg", photo(150, 200), quality=90)
    data = v2_recipe("gpu")
    images, _, _ = on_device([image_device.keep_for_validation(image_device.read_encoded(str(path)))], data)
    expected = image.val_transform(v2_recipe("tensor"))(read_rgb_tensor(str(path)))
    assert images.shape == (1, 3, 56, 56) and torch.equal(images[0], expected)


def test_gpu_code_path_reads_files_as_the_tensor_path_and_reports_the_same_unreadable_ones(tmp_path):
    """JPEGs travel as bytes; CMYK JPEGs and other files are decoded by the worker; a JPEG that fails to decode
    is read by PIL in the training process or reported with PIL's error, as the tensor path reports it."""
    folder = tmp_path / "train" / "a"
    good = write(folder / "good.jpg", photo(), quality=90)
    write(folder / "gray.jpg", photo().convert("L"), quality=90)
    write(folder / "cmyk.jpg", photo().convert("CMYK"), quality=90)
    write(folder / "p.png", photo().convert("P"), "PNG")
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "text.jpg").write_bytes(b"not an image at all")
    data = v2_recipe("gpu")
    samples = image.SafeImageFolder(str(tmp_path / "train"), transform=image_device.keep_for_validation,
                                    loader=image_device.read_encoded)
    items = {os.path.basename(path): samples[i] for i, (path, _) in enumerate(samples.samples)}
    picture, (path, reason) = items.pop("text.jpg")  # not a JPEG, not an image: the worker reports it
    assert picture is None and "UnidentifiedImageError" in reason
    names = sorted(items)
    assert {name: items[name][0].encoded.is_jpeg for name in names} == {
        "cmyk.jpg": False, "good.jpg": True, "gray.jpg": True, "p.png": False, "truncated.jpg": True}
    images, kept, bad = on_device([items[name][0] for name in names], data)
    assert [names[k] for k in kept] == ["cmyk.jpg", "good.jpg", "gray.jpg", "p.png"]
    assert len(bad) == 1 and bad[0][0].endswith("truncated.jpg")
    with pytest.raises(OSError) as pil_error:
        Image.open(folder / "truncated.jpg").convert("RGB")
    assert type(pil_error.value).__name__ in bad[0][1]
    tensor_path = image.val_transform(v2_recipe("tensor"))
    for row, name in enumerate(names[:4]):
        assert torch.equal(images[row], tensor_path(read_rgb_tensor(str(folder / name)))), name


def loader_batches(root, decode: str, workers: int, **overrides) -> tuple[list, object]:
    from dtrain.build import build_loaders
    from dtrain.dist import DistEnv
    from dtrain.workloads import build_task

    cfg = load_config(str(V2), [f"data.root={root}", "batch_size=4", f"num_workers={workers}", f"data.decode={decode}",
                                "data.train_crop_size=24", *[f"data.{k}={v}" for k, v in overrides.items()]])
    env = DistEnv(mode="single", device=torch.device("cpu"))
    loader, sampler, _ = build_loaders(cfg, env, build_task(cfg, env))
    sampler.start_epoch(0)
    batches = list(loader)[:3]
    del loader  # persistent workers end now, not at interpreter exit
    return batches, image.device_images(cfg.data, env, num_classes=3)


def test_gpu_code_path_batches_equal_the_tensor_paths_with_mixup_cutmix_and_workers(tiny_jpegs, capsys):
    """Without a policy, the training process's batch (decoded, cropped, flipped, normalised, erased, then MixUp
    or CutMix as the batch's seed drew it in the worker) is the tensor path's, with or without loader workers."""
    tensor, _ = loader_batches(tiny_jpegs, "tensor", 0, auto_augment="none", random_erase=0.5)
    mixes = set()
    for workers in (0, 1):
        batches, device_step = loader_batches(tiny_jpegs, "gpu", workers, auto_augment="none", random_erase=0.5)
        for (images, targets, bad), (encoded, labels, unreadable) in zip(tensor, batches):
            assert isinstance(encoded, image_device.EncodedBatch) and unreadable == []
            mixes.add(encoded.mix.box is None)
            on_device_images, soft_targets, bad_on_device = device_step(encoded, labels, unreadable)
            assert torch.equal(on_device_images, images) and torch.equal(soft_targets, targets)
            assert bad == bad_on_device == []
    assert mixes == {True, False}  # both MixUp and CutMix were drawn in these batches
    assert "no GPU in this run" in capsys.readouterr().out


def test_gpu_decode_names_the_first_file_its_workers_decode_once(tmp_path, capsys):
    from dtrain.dist import DistEnv

    files = [write(tmp_path / name, photo(), fmt) for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"))]
    step = image.device_images(v2_recipe("gpu"), DistEnv(mode="single", device=torch.device("cpu")), num_classes=3)
    batch = image_device.EncodedBatch.of([image_device.keep_for_validation(image_device.read_encoded(str(f)))
                                          for f in files])
    for _ in range(2):
        images, targets, bad = step(batch, torch.tensor([0, 1]), [])
        assert images.shape == (2, 3, 56, 56) and targets.tolist() == [0, 1] and bad == []
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "no GPU in this run" in lines[0]
    assert lines[1].startswith(f"data.decode=gpu: {files[0]} is not a JPEG")


def test_gpu_decode_takes_no_augmix(tmp_path):
    from dtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="data.decode=tensor for augmix"):
        v2_recipe("gpu", auto_augment="augmix")


# ---------------------------------------------------------------------------------------------
# Mid-epoch resume on JPEG files (decoded by torchvision.io)


@pytest.fixture(scope="module")
def tiny_jpegs(tmp_path_factory):
    """tiny_images' layout (3 classes, 8 training images each, 7 validation images) as JPEG photographs."""
    root = tmp_path_factory.mktemp("tiny_jpegs")
    for split, counts in {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 3, "b": 2, "c": 2}}.items():
        for ci, (cls, n) in enumerate(counts.items()):
            for i in range(n):
                write(root / split / cls / f"{i:03d}.jpg", photo(30, 40, seed=10 * ci + i), quality=90)
    return root


@pytest.mark.slow
def test_v2_recipe_on_jpegs_resumed_mid_epoch_equals_an_uninterrupted_run(tiny_jpegs, tmp_path):
    from test_recipe_runs import test_v2_recipe_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run as check

    check(tiny_jpegs, tmp_path)  # data.decode=tensor is the default: the same check as on the PNG folder


@pytest.mark.slow
def test_gpu_code_path_resumed_mid_epoch_equals_an_uninterrupted_run(tiny_jpegs, tmp_path):
    """data.decode=gpu on the CPU: workers draw, the training processes decode and augment (2 ranks, torchrun)."""
    from test_recipe_runs import test_v2_recipe_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run as check

    check(tiny_jpegs, tmp_path, extra=["data.decode=gpu"])
