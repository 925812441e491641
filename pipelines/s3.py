"""Object storage access for shards: fsspec filesystems, webdataset's `gopen` for s3:// and other fsspec
URLs, retries with backoff for transient errors, atomic writes, and a pre-flight check with clear errors.

    from pipelines import s3
    wds.gopen("s3://bucket/x.tar")               # reads through fsspec (registered when this module is imported)
    data = s3.read_bytes(url, budget_s=60, counters=c)   # retried on connection errors / 5xx; c["retries"] += n
    s3.write_bytes(url, data)                    # local: temp file + rename; object stores: one PUT
    s3.preflight(url)                            # StorageError naming the bucket/credentials problem
    s3.check_writable(url, create=False)         # writers, before any work: probe write (or create the bucket)
    s3.url_problem("pipe:curl x | sh")           # why a URL is refused (None: a local path or a registered scheme)

Only local paths (plain or file://) and the fsspec schemes in `SCHEMES` are read. Importing this module
registers the fsspec opener with webdataset, so every reader of s3:// URLs has it, and replaces every other
handler in webdataset's `gopen` table (`pipe:` runs a shell, `http(s):`, `scp:`, `sftp:`, `ftps:` run curl,
`gs:` gsutil, `ais:`/`hf:`/`htgs:` other CLIs) by one that refuses, so no URL (a config's `data.url` or a
manifest's shard name) can start a process. http(s) is refused on purpose: webdataset reads it with curl;
copy such a dataset to disk or S3 first.

Credentials and endpoints come from the usual places (AWS_ACCESS_KEY_ID/SECRET, ~/.aws, AWS_ENDPOINT_URL for
a non-AWS endpoint such as the loopback moto server in the tests). No subprocess per shard: webdataset's
`pipe:` scheme costs a Python/CLI process per shard (ENVIRONMENT.md: ~15x slower).
"""
from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import webdataset as wds
from loguru import logger

from sct.checkpoint import file_mode

# Errors that a retry can fix: the endpoint is down or restarting, a connection dropped, a 5xx/throttle.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
    "IncompleteRead", "ProtocolError", "FSTimeoutError", "TimeoutError", "ConnectionRefusedError",
    "ConnectionResetError", "BrokenPipeError", "ResponseParserError", "HTTPClientError",
}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500", "502", "504"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}

_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")  # read in-process through fsspec
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class StorageError(RuntimeError):
    """A storage problem that retrying will not fix (credentials, missing bucket, unreachable endpoint)."""


def _env_key() -> tuple:
    return tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URL; one instance per process and credentials."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    key = (protocol, os.getpid(), _env_key())
    if key not in _FS_CACHE:  # skip fsspec's own cache: it keys on arguments, not on the environment's credentials
        # s3fs/botocore would retry a refused connection ~6 s on their own; `with_retries` owns the policy and counts
        options = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 60}} if protocol in ("s3", "s3a") else {}
        fs = _FS_CACHE[key] = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if protocol in ("s3", "s3a"):
            fs.retries = 1
    fs = _FS_CACHE[key]
    return fs, fs._strip_protocol(url)


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def is_local(url: str) -> bool:
    return fsspec.core.split_protocol(url)[0] in (None, "file")


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _error_code(exc: BaseException) -> str | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code"))
    return None


def is_transient(exc: BaseException) -> bool:
    """True for connection failures, dropped reads, timeouts and 5xx/throttling anywhere in the cause chain."""
    if isinstance(exc, (FileNotFoundError, PermissionError, StorageError)):
        return False
    if _error_code(exc) in _TRANSIENT_CODES:
        return True
    return any(type(e).__name__ in _TRANSIENT_NAMES or isinstance(e, (ConnectionError, TimeoutError)) for e in _chain(exc))


def with_retries(fn, what: str, budget_s: float, counters: dict | None = None, first_delay_s: float = 0.05, max_delay_s: float = 5.0):
    """fn() retried on transient errors with exponential backoff until `budget_s` has passed; each retry counted."""
    start, delay = time.monotonic(), first_delay_s
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not is_transient(e):
                raise
            if time.monotonic() - start + delay > budget_s:
                raise StorageError(f"{what}: still failing after {time.monotonic() - start:.0f}s of retries "
                                   f"(data.retry_seconds={budget_s:g}): {type(e).__name__}: {e}") from e
            if counters is not None:
                counters["retries"] = counters.get("retries", 0) + 1
            logger.warning(f"{what}: {type(e).__name__} ({e}); retry in {delay:.2f}s")
            time.sleep(delay)
            delay = min(2 * delay, max_delay_s)


def url_problem(url: str) -> str | None:
    """None for a local path (plain or file://) or a URL of a scheme in `SCHEMES`; else why it is refused."""
    m = _SCHEME.match(url)
    if m is None or m.group(1).lower() in ("file", *SCHEMES):
        return None
    return (f"scheme '{m.group(1)}:' is not accepted: use a local path or one of "
            f"{', '.join(s + '://' for s in SCHEMES)} (webdataset would run a shell or curl for it)")


def open_url(url: str, mode: str = "rb"):
    """Open a local path or a `SCHEMES` URL in-process; ValueError for anything else (never a subprocess)."""
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(f"{url}: {problem}")
    if is_local(url):
        return open(fsspec.core.strip_protocol(url), mode)
    return gopen_fsspec(url, mode)


def read_bytes(url: str, budget_s: float = 60.0, counters: dict | None = None) -> bytes:
    """The whole object at `url` (one GET, in-process), retried on transient errors."""
    def get() -> bytes:
        with open_url(url, "rb") as f:
            return f.read()
    return with_retries(get, f"reading {url}", budget_s, counters)


def write_bytes(url: str, data: bytes) -> None:
    """Atomic write: a local file appears complete or not at all; an object-store PUT is atomic by itself."""
    if is_local(url):
        path = Path(fsspec.core.strip_protocol(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, file_mode())  # mkstemp's 0600 -> what open() would give (0644 under umask 022)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.pipe_file(path, data), f"writing {url}", 60.0)


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset gopen handler: any fsspec URL (s3://, gs://, az://, memory://) opened in-process."""
    fs, path = filesystem(url)
    return fs.open(path, mode)


def _gopen_refused(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    raise ValueError(f"{url}: {url_problem(url) or 'refused'}")


def register_gopen(protocols: tuple[str, ...] = SCHEMES) -> None:
    """Make wds.gopen (and wds.WebDataset) read these URL schemes through fsspec, and refuse every other
    scheme (pipe:, http(s):, ... would start a shell or a CLI subprocess)."""
    for p in list(wds.gopen_schemes):
        wds.gopen_schemes[p] = _gopen_refused
    for p in protocols:
        wds.gopen_schemes[p] = gopen_fsspec



def explain(url: str, exc: BaseException) -> str:
    """A one-line diagnosis of why `url` cannot be read, naming the bucket/endpoint and what to set."""
    code = _error_code(exc)
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    names = {type(e).__name__ for e in _chain(exc)}
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if code in _CREDENTIAL_CODES or isinstance(exc, PermissionError):
        return f"credentials rejected for bucket '{bucket}' at {endpoint} ({code or type(exc).__name__}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
    if code == "NoSuchBucket" or "NoSuchBucket" in str(exc):
        return f"bucket '{bucket}' does not exist at {endpoint}"
    if isinstance(exc, FileNotFoundError):
        return f"{url} not found (no manifest.json there: write shards with `python -m pipelines.shards`)"
    if is_transient(exc) or isinstance(exc, StorageError):
        return f"cannot reach {endpoint} for {url} ({type(exc).__name__}): check AWS_ENDPOINT_URL and the network"
    return f"cannot read {url}: {type(exc).__name__}: {exc}"


def check_writable(url: str, create: bool = False, budget_s: float = 3.0) -> None:
    """Before a writer does any work: write and delete a probe object under `url` (with `create`, make the bucket
    first if it is missing); StorageError with one line naming the bucket/credentials/endpoint problem if not."""
    if is_local(url):
        try:
            Path(fsspec.core.strip_protocol(url)).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot write to {url}: {e}") from None
        return
    fs, path = filesystem(url)
    bucket, probe = path.split("/", 1)[0], path.rstrip("/") + f"/.sct-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        if create and not with_retries(lambda: fs.exists(bucket), f"checking bucket {bucket}", budget_s):
            try:
                with_retries(lambda: fs.mkdir(bucket), f"creating bucket {bucket}", budget_s)
                logger.info(f"created bucket '{bucket}'")
            except Exception:  # another rank may have created it just now: re-raised if not
                fs.invalidate_cache(bucket)
                if not fs.exists(bucket):
                    raise
        with_retries(lambda: fs.pipe_file(probe, b""), f"writing {url}", budget_s)
        with_retries(lambda: fs.rm_file(probe), f"deleting {probe}", budget_s)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        hint = " (create it, or pass --create-bucket)" if _error_code(e) == "NoSuchBucket" and not create else ""
        raise StorageError(explain(url, e) + hint) from None


def preflight(url: str, budget_s: float = 3.0) -> bytes:
    """Read `url` once with a short retry budget; raise StorageError with `explain`'s message on failure."""
    try:
        return read_bytes(url, budget_s=budget_s)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise StorageError(explain(url, e)) from e


register_gopen()  # on import: no process that reads shards through sct keeps webdataset's shell handlers
