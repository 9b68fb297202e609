"""The checkpoint file format: a tree of tensors and plain values in one safetensors file.

Loading a checkpoint never executes code (no pickle). Any nested structure of dicts, lists,
tuples, scalars, strings, None and tensors (a "tree": model and optimizer state dicts, RNG
states, counters) is stored as one file: tensors as entries, the structure as JSON in the file's
metadata. What the trainer puts in it is :mod:`rnnreg.lm.training.resume`'s business.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, TypeAlias

import safetensors
import safetensors.torch
import torch

from rnnreg.lm.rundir.files import RunDirError, StrPath, replacing

__all__ = ["Tree", "load_tree", "save_tree"]

Tree: TypeAlias = Any
"""Nested dict (str or int keys) / list / tuple / int / float / bool / str / None / Tensor."""

_TREE_FORMAT = "rnnreg-tree/1"



def _escape_key(key: str) -> str:
    """Make a dict key safe inside a "/"-separated entry name ("~" is the escape character)."""
    return key.replace("~", "~0").replace("/", "~1")


def _child_path(path: str, part: str) -> str:
    return f"{path}/{part}" if path else part


def _encode(node: Tree, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn a tree into JSON, moving tensors into `tensors` under their path.

    Every JSON object in the result is a one-key tag, so user data can never be mistaken for
    structure: {"__tensor__": name}, {"__tuple__": [...]} and {"__dict__": [[key, value], ...]}.
    Dicts are stored as pairs because JSON object keys are always strings, while optimizer state
    dicts use int keys that must come back as ints.
    """
    if isinstance(node, torch.Tensor):
        return {"__tensor__": _add_tensor(node, path, tensors)}
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list | tuple):
        items = [_encode(v, _child_path(path, str(i)), tensors) for i, v in enumerate(node)]
        return items if isinstance(node, list) else {"__tuple__": items}
    if isinstance(node, dict):
        pairs = []
        for key, value in node.items():
            _check_key(key, path)
            pairs.append([key, _encode(value, _child_path(path, _escape_key(str(key))), tensors)])
        return {"__dict__": pairs}
    raise TypeError(
        f"cannot save a {type(node).__name__} at {path or '<root>'!r} in a checkpoint; convert it "
        "to a tensor, a plain Python scalar/str/None, or a dict/list/tuple of those"
    )


def _check_key(key: object, path: str) -> None:
    # bool is an int subclass, but True would come back as 1 from JSON; refuse rather than mangle.
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise TypeError(
            f"dict key {key!r} at {path or '<root>'!r} is a {type(key).__name__}; checkpoint dicts "
            "need str or int keys"
        )


def _add_tensor(tensor: torch.Tensor, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Store a private, contiguous CPU copy of `tensor` under `name`.

    Copying is what lets tied weights (two names, one storage) and views be saved: safetensors
    refuses tensors that share memory or do not own their whole storage.
    """
    if name in tensors:
        raise ValueError(
            f"two tensors map to checkpoint entry {name!r} (dict keys like 1 and '1' side by "
            "side); rename one of the keys"
        )
    if tensor.layout != torch.strided:
        raise TypeError(f"cannot save the {tensor.layout} tensor at {name!r}; make it dense first")
    tensors[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return name


def _decode(node: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Tree:
    """Inverse of `_encode`; malformed structure raises KeyError/TypeError/ValueError."""
    if isinstance(node, list):
        return [_decode(v, tensors, device) for v in node]
    if not isinstance(node, dict):
        return node
    ((tag, value),) = node.items()
    if tag == "__tensor__":
        return tensors[value].to(device)
    if tag == "__tuple__":
        return tuple(_decode(v, tensors, device) for v in value)
    if tag == "__dict__":
        return {key: _decode(v, tensors, device) for key, v in value}
    raise ValueError(f"unknown tag {tag!r}")


def save_tree(path: StrPath, tree: Tree) -> None:
    """Save a tree as one safetensors file, atomically (see `atomic_write_bytes`).

    Tensors come back as plain tensors (not Parameters) with the same dtype and shape; storage
    sharing between tensors is not preserved (tie weights again after loading a model). Dict
    subclasses come back as plain dicts, so a state dict loses its `_metadata` attribute, which
    `load_state_dict` only needs for modules whose state format changed across torch versions.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, "", tensors)
    metadata = {"format": _TREE_FORMAT, "tree": json.dumps(structure)}
    with replacing(Path(path)) as tmp:
        # Writing straight to the file avoids holding a second in-memory copy of all the weights.
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        except safetensors.SafetensorError as error:
            raise _os_error(error) from error


def _os_error(error: Exception) -> Exception:
    """The OSError inside a SafetensorError, so that a full disk reads like one.

    safetensors reports I/O failures as its own exception type, with the OS error only in the
    text ("... No space left on device (os error 28)"); anything else is returned unchanged.
    """
    found = re.search(r"os error (\d+)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def load_tree(path: StrPath, device: str | torch.device = "cpu") -> Tree:
    """Load a tree saved by `save_tree`, with every tensor on `device`. Never executes code."""
    path = Path(path)
    advice = "load an earlier checkpoint or rerun the training that wrote it"
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise RunDirError(f"checkpoint {path} does not exist") from None
    except (safetensors.SafetensorError, OSError) as e:
        raise RunDirError(f"checkpoint {path} is truncated or corrupt ({e}); {advice}") from e
    if metadata.get("format") != _TREE_FORMAT:
        raise RunDirError(
            f"{path} is not an rnnreg checkpoint (format {metadata.get('format')!r}, expected "
            f"{_TREE_FORMAT!r}); load it with safetensors directly"
        )
    try:
        return _decode(json.loads(metadata["tree"]), tensors, torch.device(device))
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"checkpoint {path} has a corrupt structure ({e!r}); {advice}") from e
