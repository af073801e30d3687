"""What a `[server.cache] dir` names: a local folder, however it is spelt, or a remote zarr store URL.

One writer per local folder is held by a kernel lock on the folder (folder_lock), and it holds only if every spelling
of one folder reaches the cache as that folder. So each of these becomes the real folder (symlinks and `..`
resolved): a path (relative to `base`, with `..`, a trailing slash, through a symlink); a `file:` or `local:` URL of
an absolute folder, its scheme in any letter case; either behind fsspec's cache layers (`simplecache::`,
`filecache::`, `blockcache::`), which write the folder's own files. The cache then opens the folder itself, with a
folder's guarantees (the lock, atomic chunk files, `.damaged/`, fsync), not through the layer.

Refused, with what was expected and what came: a URL whose target is the local file system in any other form
(`zip::file:///a.zip`, `dir::file:///x`: no folder to lock), a `file:` URL of another host or of a relative path,
and a protocol fsspec does not know or cannot load here. Any other URL is a remote store (s3://, gs://, memory://),
passed on as given with its schemes in lower case; nothing locks it (one writer per prefix is the operator's to keep).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.configfile import ConfigError

# fsspec's names for the local file system
LOCAL_SCHEMES = ("file", "local")
EXPECTED = (
    "expected a local folder (a path, or a file URL of an absolute folder: file:///path/to/cache) or a zarr store "
    "URL (s3://bucket/prefix)"
)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)


def cache_location(spec: str, base: Path) -> Path | str:
    """The real folder `spec` names (a Path), or the remote store URL it is (a str); ConfigError for anything else.

    A relative path is relative to `base`."""
    *layers, target = spec.split("::")
    scheme, rest = _scheme(target)
    if scheme is not None and not _is_local(spec, scheme):
        return _remote(spec, [*layers, target])
    for layer in layers:
        _check_cache_layer(spec, layer)
    folder = base / target if scheme is None else _file_url_folder(spec, rest)
    return Path(os.path.realpath(folder))


def _is_local(spec: str, scheme: str) -> bool:
    """`file:` and `local:` name the local file system; so does any protocol whose file system is fsspec's local one
    (morefs's `asynclocal`)."""
    if scheme in LOCAL_SCHEMES:
        return True
    from fsspec.implementations.local import LocalFileSystem

    return issubclass(_filesystem_class(spec, scheme), LocalFileSystem)


def _scheme(part: str) -> tuple[str | None, str]:
    """(the lower-case scheme, the rest) of a URL; (None, part) for a path. `name:` begins a URL only as `name://`
    or as a local scheme (`file:relative` is a bad file URL, not a folder of that name)."""
    match = _SCHEME.fullmatch(part)
    if match is None:
        return None, part
    scheme, rest = match.group(1).lower(), match.group(2)
    if rest.startswith("//") or scheme in LOCAL_SCHEMES:
        return scheme, rest
    return None, part


def _file_url_folder(spec: str, rest: str) -> str:
    parts = urlsplit("file:" + rest)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query or parts.fragment:
        raise ConfigError(
            f"server.cache.dir: {EXPECTED}, got {spec!r}: a file URL must name an absolute folder on this machine, "
            "with no query or fragment"
        )
    return unquote(parts.path)


def _check_cache_layer(spec: str, layer: str) -> None:
    """A layer over a local folder must be one of fsspec's cache layers, bare: those read and write the folder's
    own files, so the folder stands for the whole URL. Any other layer (an archive, a subfolder view) names no
    folder to lock."""
    from fsspec.implementations.cached import CachingFileSystem

    protocol = _lower_scheme(layer).split(":", 1)[0]
    bare = _lower_scheme(layer) in (protocol, protocol + "://")
    if not (bare and issubclass(_filesystem_class(spec, protocol), CachingFileSystem)):
        raise ConfigError(
            f"server.cache.dir: {EXPECTED}, got {spec!r}: {layer!r} over the local file system names no folder that "
            "can be locked against a second writer (only simplecache::, filecache:: or blockcache:: may stand over "
            "one); give the folder itself"
        )


def _remote(spec: str, parts: list[str]) -> str:
    """A remote store URL, its schemes in lower case: every protocol in it known to fsspec and loadable here, and
    the last one a store, not a layer that needs another file system under it."""
    lowered = [_lower_scheme(part) for part in parts]
    classes = [_filesystem_class(spec, part.split(":", 1)[0]) for part in lowered]
    if issubclass(classes[-1], _layers()):
        raise ConfigError(
            f"server.cache.dir: {EXPECTED}, got {spec!r}: {lowered[-1].split(':', 1)[0]!r} stands over another file "
            "system, which the URL does not name after it (as in simplecache::s3://bucket/prefix)"
        )
    return "::".join(lowered)


def _layers() -> tuple[type, ...]:
    """fsspec's file systems that stand over another one (a cache, a subfolder view, an archive, references)."""
    from fsspec.archive import AbstractArchiveFileSystem
    from fsspec.generic import GenericFileSystem
    from fsspec.implementations.cached import CachingFileSystem
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.reference import ReferenceFileSystem

    return CachingFileSystem, DirFileSystem, AbstractArchiveFileSystem, GenericFileSystem, ReferenceFileSystem


def _lower_scheme(part: str) -> str:
    """`S3://Bucket/X` -> `s3://Bucket/X`; a bare layer name (`SimpleCache`) all in lower case."""
    name, colon, rest = part.partition(":")
    return name.lower() + colon + rest


def _filesystem_class(spec: str, protocol: str) -> type:
    import fsspec

    if protocol not in fsspec.available_protocols():
        raise ConfigError(f"server.cache.dir: {EXPECTED}, got {spec!r}: fsspec knows no protocol {protocol!r}")
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ConfigError(
            f"server.cache.dir: {EXPECTED}, got {spec!r}: protocol {protocol!r} needs a package that is not "
            f"installed ({' '.join(str(exc).split())})"
        ) from None
