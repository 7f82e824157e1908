"""Named merges: a merge spec registered under a name that works wherever an adapter id does.

A name is registered by ``Merge`` with a ``name`` (gRPC), ``POST /merges`` (HTTP) or loaded at
start from ``--merges FILE`` (JSON: ``{"name": {merge spec fields}}``, so every replica of a
fleet knows the same names). The registry checks the name (it may not shadow an adapter id) and
the spec (``parse_merge_spec``, the one validation); resolving the name gives the spec, which is
then served exactly like an inline spec: same cache key, same affinity key.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hotmerge.errors import InvalidArgument
from hotmerge.merging.spec import MergeSpec, merged_adapters_from_dict, parse_merge_spec
from hotmerge.v1 import hotmerge_pb2 as pb

# Names go into URLs, metrics labels and OpenAI model ids: keep them plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")


@dataclass(frozen=True)
class NamedMerge:
    name: str
    spec: MergeSpec
    message: pb.MergedAdapters  # the spec as registered (for listings)


class NamedMerges:
    """Thread-safe name -> spec registry. ``is_adapter(name)`` says whether an adapter has it."""

    def __init__(self, is_adapter: Callable[[str], bool], *, max_adapters: int = 16) -> None:
        self.is_adapter = is_adapter
        self.max_adapters = max_adapters
        self._lock = threading.Lock()
        self._merges: dict[str, NamedMerge] = {}

    def register(self, name: str, message: pb.MergedAdapters) -> NamedMerge:
        """Validate and register (replacing a merge of that name); raises InvalidArgument."""
        if not NAME_PATTERN.fullmatch(name or ""):
            raise InvalidArgument(
                f"name {name!r}: use 1-128 letters, digits and . _ : @ / -, starting with a "
                "letter or digit"
            )
        if self.is_adapter(name):
            raise InvalidArgument(
                f"name {name!r} is an adapter id; a named merge cannot shadow it: pick another"
            )
        spec = parse_merge_spec(message, max_adapters=self.max_adapters)
        merge = NamedMerge(name, spec, message)
        with self._lock:
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
        staged = NamedMerges(self.is_adapter, max_adapters=self.max_adapters)
        for name, fields in data.items():  # all checked before any is registered here
            try:
                staged.register(name, merged_adapters_from_dict(fields))
            except InvalidArgument as err:
                raise InvalidArgument(f"merges file {path}, {name!r}: {err}") from None
        with self._lock:
            self._merges.update(staged._merges)
        return list(staged._merges)
