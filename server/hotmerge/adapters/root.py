"""The adapter root: the folder whose subfolders are the adapters, and what an id names in it.

An adapter id is ``name`` or ``org/name``: a folder under the root holding ``adapter_config.json``
and ``adapter_model.safetensors``. Ids are checked before the disk is looked at, and never
resolve outside the root (``..``, absolute paths, symlinks out, symlink loops and files that are
not regular files are refused). With ``allow_hub``, an ``org/name`` id missing here is fetched
from the Hugging Face hub into the root.
"""

from __future__ import annotations

import re
from pathlib import Path

from hotmerge.adapters.files import CONFIG_FILE, WEIGHTS_FILE, short
from hotmerge.errors import InvalidArgument, NotFound

__all__ = ["MAX_ID_PART", "AdapterRoot"]

# One or two path components of plain characters; no component may start with '.'.
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)?")
MAX_ID_PART = 255  # a file name's limit on common file systems


class AdapterRoot:
    """The folder of adapters: checks ids, resolves them to folders, lists the ids found."""

    def __init__(self, path: Path | str, *, allow_hub: bool = False) -> None:
        self.path = Path(path)
        self.allow_hub = allow_hub

    @staticmethod
    def check_id(adapter_id: str) -> None:
        """InvalidArgument unless ``adapter_id`` is ``name`` or ``org/name`` of plain parts."""
        if not isinstance(adapter_id, str) or not _ID_RE.fullmatch(adapter_id):
            raise InvalidArgument(
                f"adapter id {short(str(adapter_id))} is not valid: use 'name' or 'org/name' "
                "(letters, digits, '.', '_', '-'; no '..', no absolute path)"
            )
        longest = max(len(part) for part in adapter_id.split("/"))
        if longest > MAX_ID_PART:
            raise InvalidArgument(
                f"adapter id {short(adapter_id)} has a part of {longest} characters; each part "
                f"of an id is a folder name, at most {MAX_ID_PART} characters"
            )

    def local_dir(self, adapter_id: str) -> Path:
        """The adapter's directory under the root; never a path outside it (symlinks too)."""
        self.check_id(adapter_id)
        try:
            root = self.path.resolve()
            directory = (root / adapter_id).resolve()
            if not directory.is_relative_to(root):
                raise InvalidArgument(
                    f"adapter id {short(adapter_id)} resolves outside the adapter root"
                )
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                path = directory / name
                if path.exists() and not path.resolve().is_relative_to(root):
                    raise InvalidArgument(
                        f"adapter {short(adapter_id)}: {name} resolves outside the adapter root"
                    )
        except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError on Python 3.11)
            raise InvalidArgument(
                f"adapter {short(adapter_id)}: its path cannot be resolved ({exc}); a symlink loop?"
            ) from None
        return directory

    def has_adapter_dir(self, name: str) -> bool:
        """Whether ``name`` is an adapter id with a folder under the root. A name that is not a
        valid id is not one, and the disk is never looked at outside the root."""
        try:
            return self.local_dir(name).is_dir()
        except InvalidArgument:
            return False

    def resolve(self, adapter_id: str) -> Path:
        """The adapter's folder with both files as regular files (fetched from the hub if
        allowed); NotFound or InvalidArgument, naming what is missing, otherwise."""
        directory = self.local_dir(adapter_id)
        if not (directory / CONFIG_FILE).is_file():
            if self.allow_hub and "/" in adapter_id:
                return self._download(adapter_id)
            raise NotFound(f"adapter {short(adapter_id)} not found under the adapter root")
        if not (directory / WEIGHTS_FILE).is_file():
            if any(directory.glob("*.bin")):
                raise InvalidArgument(
                    f"adapter {short(adapter_id)} has only pickle weights (.bin); convert it to "
                    f"safetensors ({WEIGHTS_FILE}), e.g. load it with peft and save_pretrained"
                )
            raise NotFound(f"adapter {short(adapter_id)}: no {WEIGHTS_FILE} in its directory")
        return directory

    def _download(self, adapter_id: str) -> Path:
        """Fetch config + safetensors of a hub adapter into the root (only with allow_hub)."""
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                repo_id=adapter_id,
                allow_patterns=[CONFIG_FILE, "*.safetensors"],
                local_dir=str(self.path / adapter_id),
            )
        except Exception as exc:  # the hub's errors are many; all mean "could not get it"
            raise NotFound(f"adapter {short(adapter_id)}: hub download failed: {exc}") from exc
        directory = Path(path)
        if not (directory / WEIGHTS_FILE).is_file():
            raise InvalidArgument(
                f"adapter {short(adapter_id)}: the hub repo has no {WEIGHTS_FILE}"
            )
        return directory

    def ids(self) -> list[str]:
        """The ids of the folders under the root that hold a config (``name``, then
        ``org/name``); folders whose names are not valid ids are left out."""
        if not self.path.is_dir():
            return []
        found = []
        for config in sorted(self.path.glob(f"*/{CONFIG_FILE}")) + sorted(
            self.path.glob(f"*/*/{CONFIG_FILE}")
        ):
            adapter_id = config.parent.relative_to(self.path).as_posix()
            if _ID_RE.fullmatch(adapter_id):
                found.append(adapter_id)
        return found

    @staticmethod
    def file_key(directory: Path) -> tuple:
        """What a revision is remembered by: (folder, weights size, mtime, config size, mtime),
        so it changes when either file is replaced."""
        try:
            st, sc = (directory / WEIGHTS_FILE).stat(), (directory / CONFIG_FILE).stat()
        except OSError:  # vanished or a loop since it was read: no revision to remember
            return (str(directory),)
        return (str(directory), st.st_size, st.st_mtime_ns, sc.st_size, sc.st_mtime_ns)
