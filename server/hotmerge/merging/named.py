"""Named merges: a merge spec registered under a name that works wherever an adapter id does.

A name is registered by ``Merge`` with a ``name`` (gRPC), ``POST /merges`` (HTTP) or loaded at
start from ``--merges FILE`` (JSON: ``{"name": {merge spec fields}}``, so every replica of a
fleet knows the same names). The registry checks the name (it may not shadow an adapter id) and
the spec (``parse_merge_spec``, the one validation); resolving the name gives the spec, which is
then served exactly like an inline spec: same cache key, same affinity key.

A name is registered only once its merge succeeded (``check`` first, ``register`` after), a
registered name is replaced only when the caller says ``replace``, and at most ``max_names``
names are held (``--max-named-merges``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hotmerge.errors import InvalidArgument, ResourceExhausted
from hotmerge.merging.spec import MergeSpec, merged_adapters_from_dict, parse_merge_spec
from hotmerge.v1 import hotmerge_pb2 as pb

# Names go into URLs, metrics labels and OpenAI model ids: keep them plain. Parts separated by
# '/' each start with a letter or digit (no '.', '..' or empty parts).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*(/[A-Za-z0-9][A-Za-z0-9._:@-]*)*")
MAX_NAME_CHARS = 128
DEFAULT_MAX_NAMES = 1024


@dataclass(frozen=True)
class NamedMerge:
    name: str
    spec: MergeSpec
    message: pb.MergedAdapters  # the spec as registered (for listings)


class NamedMerges:
    """Thread-safe name -> spec registry. ``is_adapter(name)`` says whether an adapter has it."""

    def __init__(
        self,
        is_adapter: Callable[[str], bool],
        *,
        max_adapters: int = 16,
        max_names: int = DEFAULT_MAX_NAMES,
    ) -> None:
        self.is_adapter = is_adapter
        self.max_adapters = max_adapters
        self.max_names = max_names
        self._lock = threading.Lock()
        self._merges: dict[str, NamedMerge] = {}

    def check(
        self, name: str, *, replace: bool = False, message: pb.MergedAdapters | None = None
    ) -> None:
        """Raise InvalidArgument unless ``name`` may be registered now (no merge is run).
        Registering a name again with the spec it has is not a replacement."""
        if (
            not isinstance(name, str)
            or len(name) > MAX_NAME_CHARS
            or not NAME_PATTERN.fullmatch(name)
        ):
            raise InvalidArgument(
                f"name {name!r:.80}: use 1-{MAX_NAME_CHARS} letters, digits and . _ : @ - in "
                "parts separated by '/', each starting with a letter or digit"
            )
        if self.is_adapter(name):
            raise InvalidArgument(
                f"name {name!r} is an adapter id; a named merge cannot shadow it: pick another"
            )
        with self._lock:
            if name in self._merges:
                same = message is not None and self._merges[name].message == message
                if not replace and not same:
                    raise InvalidArgument(
                        f"name {name!r} is already registered; set replace (gRPC "
                        'MergeRequest.replace, HTTP "replace": true, CLI --replace) to '
                        "replace it, or pick another name"
                    )
            elif len(self._merges) >= self.max_names:
                raise ResourceExhausted(
                    f"{len(self._merges)} named merges are registered, the server's maximum "
                    f"(--max-named-merges {self.max_names}); replace one or raise the maximum"
                )

    def register(
        self, name: str, message: pb.MergedAdapters, *, replace: bool = False
    ) -> NamedMerge:
        """Validate and register; raises InvalidArgument (ResourceExhausted when full)."""
        self.check(name, replace=replace, message=message)
        spec = parse_merge_spec(message, max_adapters=self.max_adapters)
        merge = NamedMerge(name, spec, message)
        with self._lock:
            if name not in self._merges and len(self._merges) >= self.max_names:
                raise ResourceExhausted(
                    f"the server holds its maximum of {self.max_names} named merges "
                    "(--max-named-merges)"
                )
            self._merges[name] = merge
        return merge

    def get(self, name: str) -> NamedMerge | None:
        return self._merges.get(name)

    def list(self) -> list[NamedMerge]:
        with self._lock:
            return sorted(self._merges.values(), key=lambda m: m.name)

    def load_file(self, path: Path | str) -> list[str]:
        """Register every merge of a JSON file ``{"name": {spec}}``; all or none. Returns names."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InvalidArgument(f"merges file {path}: {err}") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f'merges file {path}: give an object {{"name": {{spec}}}}')
        staged = NamedMerges(
            self.is_adapter, max_adapters=self.max_adapters, max_names=self.max_names
        )
        for name, fields in data.items():  # all checked before any is registered here
            try:
                staged.register(name, merged_adapters_from_dict(fields))
            except (InvalidArgument, ResourceExhausted) as err:
                raise InvalidArgument(f"merges file {path}, {name!r}: {err}") from None
        with self._lock:
            self._merges.update(staged._merges)
        return list(staged._merges)
