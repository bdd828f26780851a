"""Textual-inversion embeddings: the files of an embeddings folder, read from
their headers (nothing is unpickled), and which of them a model's text encoders
can take.

The engine looks an embedding up by its name (the file's stem, any case) in
the prompt's words, and takes each of the file's vectors as one token. Its
vectors must be as wide as one of the model's CLIP text encoders: 768 for SD
1.x (CLIP-L), 1024 for SD 2.x (OpenCLIP-H), 768 and 1280 for SDXL (CLIP-L and
CLIP-G, one set of vectors each).
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sfumato.errors import InvalidParameterError, SfumatoError
from sfumato.families.detect import (
    FAMILY_NAMES,
    FAMILY_SD1,
    FAMILY_SD2,
    FAMILY_SDXL,
    Family,
    read_safetensors,
)

EMBEDDING_SUFFIXES = (".pt", ".safetensors")

TEXT_WIDTHS: dict[Family, tuple[int, ...]] = {FAMILY_SD1: (768,), FAMILY_SD2: (1024,), FAMILY_SDXL: (768, 1280)}
"""The widths of the CLIP text encoders of the families that take embeddings."""


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its name (the file's stem), path, and the shapes of its
    vector sets, ``(vectors, width)`` each."""

    name: str
    path: Path
    shapes: tuple[tuple[int, int], ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted({width for _, width in self.shapes}))

    @property
    def vectors(self) -> int:
        """How many tokens the embedding stands for (its first vector set's rows)."""
        return self.shapes[0][0]

    def misfit(self, family: Family) -> str | None:
        """Why the text encoders of ``family`` cannot take this embedding, or ``None`` if they can."""
        wanted = TEXT_WIDTHS.get(family)
        name = FAMILY_NAMES[family]
        if wanted is None:
            return f"{name} has no CLIP text encoder to take textual-inversion embeddings"
        if set(self.widths) != set(wanted):
            have = " and ".join(str(w) for w in self.widths)
            takes = " and ".join(str(w) for w in wanted)
            return f"its vectors are {have} wide; {name}'s text encoders take {takes}"
        return None


class NotAnEmbeddingError(SfumatoError):
    """A file of the embeddings folder holds no embedding vectors."""


def _as_vectors(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) == 1 and shape[0] > 0:
        return 1, shape[0]
    if len(shape) == 2 and min(shape) > 0:
        return shape[0], shape[1]
    return None


def _torch_shapes(path: Path) -> list[tuple[int, ...]]:
    """The sizes of the tensors a PyTorch zip pickles, read from its opcodes: each
    tensor is rebuilt from a persistent storage id, an offset, then its size tuple."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise NotAnEmbeddingError(f"{path}: a zip file without data.pkl is not a PyTorch file")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile as exc:
        raise NotAnEmbeddingError(f"{path}: not a readable PyTorch file ({exc})") from None
    shapes: list[tuple[int, ...]] = []
    after_storage: int | None = None  # ints seen since the last storage id; the first is the offset
    size: list[int] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name == "BINPERSID":
                after_storage, size = 0, []
            elif after_storage is not None and opcode.name.startswith(("BININT", "LONG")) and isinstance(arg, int):
                after_storage += 1
                if after_storage > 1:
                    size.append(arg)
            elif after_storage is not None and opcode.name.startswith("TUPLE") and after_storage >= 1:
                shapes.append(tuple(size))
                after_storage = None
            elif after_storage is not None and opcode.name not in ("MARK", "BINPUT", "LONG_BINPUT"):
                after_storage = None
    except (ValueError, EOFError) as exc:
        raise NotAnEmbeddingError(f"{path}: corrupt pickle ({exc})") from None
    return shapes


def read_embedding(path: Path) -> Embedding:
    """The embedding of ``path`` (``.safetensors``, or an A1111 ``.pt``).

    Raises
    ------
    NotAnEmbeddingError
        When the file holds no vector set (a 1-D or 2-D tensor).
    """
    if path.suffix.lower() == ".safetensors":
        try:
            raw = list(read_safetensors(path).shapes.values())
        except SfumatoError as exc:
            raise NotAnEmbeddingError(str(exc)) from None
    else:
        raw = _torch_shapes(path)
    shapes = tuple(v for v in map(_as_vectors, raw) if v is not None)
    if not shapes or len(shapes) != len(raw) or len(shapes) > 2:
        raise NotAnEmbeddingError(f"{path}: not a textual-inversion embedding (one or two sets of vectors)")
    return Embedding(path.stem, path, shapes)


def scan(folder: Path, read: Callable[[Path], Embedding] = read_embedding) -> tuple[list[Embedding], dict[str, str]]:
    """The embeddings of ``folder`` (each file read by ``read``) and, by name, why
    each other candidate file is not one."""
    found: list[Embedding] = []
    unreadable: dict[str, str] = {}
    if not folder.is_dir():
        return found, unreadable
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES:
            try:
                found.append(read(path))
            except NotAnEmbeddingError as exc:
                unreadable[path.stem] = str(exc)
    return found, unreadable


def sort_out(
    found: list[Embedding], unreadable: dict[str, str], family: Family
) -> tuple[dict[str, Embedding], dict[str, str]]:
    """Of a folder's embeddings, those the text encoders of ``family`` take, by name,
    and why each other file is skipped."""
    usable: dict[str, Embedding] = {}
    skipped = dict(unreadable)
    for embedding in found:
        why = embedding.misfit(family)
        if why is None:
            usable[embedding.name] = embedding
        else:
            skipped[embedding.name] = why
    return usable, skipped


def refuse_skipped(prompts: dict[str, str], skipped: dict[str, str], model: str) -> None:
    """Raise for the first prompt (by field) that names a skipped embedding.

    Raises
    ------
    InvalidParameterError
        Naming the prompt's field, the embedding and why ``model`` cannot use it.
    """
    for field, text in prompts.items():
        for name in named_in(text, list(skipped)):
            raise InvalidParameterError(
                field, f"names the embedding {name!r}, which {model} cannot use: {skipped[name]}"
            )


def named_in(text: str, names: list[str]) -> list[str]:
    """The names of ``names`` that ``text`` says as words (any case), as the engine's tokenizer matches them."""
    return [n for n in names if re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", text, re.IGNORECASE)]
