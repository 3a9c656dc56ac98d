"""MLflow tracking for the training loop: rank 0 only, and never the reason a run dies.

Every public method is a no-op on other ranks, when tracking is disabled, and after the first
MLflow failure (which prints one warning line). mlflow itself is imported only by an active
tracker, so worker ranks never pay for it.

In a multi-process run, model uploads (`log_hf_model`, `log_pyfunc_model`: a 70B export takes
longer than the process group's collective timeout) wait until the run ends (`end`, after the
training loop's last collective): the other ranks are then done, never waiting in a
collective while rank 0 uploads.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import posixpath
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Limits of the MLflow REST API (mlflow.utils.validation in mlflow 3.x).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# mlflow retries a failing request 7 times with exponential backoff and waits 120 s per attempt:
# minutes of stalled training for one metric. These bound it for this process unless the user
# chose otherwise.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# Uploading a multi-GB checkpoint through the server's artifact proxy can take longer than one
# ordinary request timeout before the server answers.
ARTIFACT_REQUEST_TIMEOUT = "900"
PROBE_TIMEOUT_S = 3.0

_BAD_KEY_CHARS = re.compile(r"[^\w/.\- ]")
_TRUNCATION_MARKER = "...[truncated {n} chars]"
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys, because MLflow params are a flat string map.

    Lists and tuples become JSON strings and None becomes "None", so every value survives the
    trip to a param unambiguously.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, name))
            else:
                out[name] = "{}"
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(list(value), default=str)
        elif value is None:
            out[name] = "None"
        else:
            out[name] = value
    return out


_LAYER_KEY = re.compile(r"^(?P<name>.+)/L(?P<layer>\d+)$")


def layer_curves(
    history: Sequence[Mapping[str, float]], prefix: str = "train"
) -> dict[int, dict[str, float]]:
    """Per-layer method metrics (``loss_mcl/L12``) of the first and last logged step, keyed by
    layer: logged with step = layer, MLflow draws ``train/loss_mcl_by_layer/{first,last}``
    against the layer (its run page: one section per key up to the last ``/``)."""
    out: dict[int, dict[str, float]] = {}
    if not history:
        return out
    for label, metrics in (("first", history[0]), ("last", history[-1])):
        for key, value in metrics.items():
            match = _LAYER_KEY.match(key)
            if match:
                name = f"{prefix}/{match['name']}_by_layer/{label}"
                out.setdefault(int(match["layer"]), {})[name] = value
    return out


def sanitize_key(key: str) -> str:
    """Make a metric/param/tag name MLflow accepts instead of letting it reject the whole batch."""
    name = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p if p != ".." else "__" for p in name.split("/") if p not in ("", ".")]
    name = "/".join(parts) or "_"
    if name.startswith(".."):
        name = "_" + name
    if len(name) > MAX_KEY_LENGTH:
        digest = f"{zlib.crc32(name.encode()):08x}"
        name = name[: MAX_KEY_LENGTH - len(digest) - 1].rstrip("/") + "_" + digest
    return name


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = _TRUNCATION_MARKER.format(n=len(value))
    return value[: limit - len(marker)] + marker


def _json_safe(obj: Any) -> Any:
    # log_dict json.dump()s without a default; a Path or dtype in a config must not be fatal.
    return json.loads(json.dumps(obj, default=str))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return _truncate(f"{type(exc).__name__}: {text}", limit)


_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:token|access_token|api_key|apikey|key|password|secret|sig)=)[^&\s\"']+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``scheme://user:***@host`` and ``?token=***``: credentials never reach a log or a param."""
    text = _URI_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
    return _SECRET_QUERY.sub(r"\g<key>***", text)


def _warn(message: str) -> None:
    print(f"mlflow: {redact(message)}", file=sys.stderr, flush=True)


def _local_sqlite_uri(workdir: str | os.PathLike) -> str:
    # The exact form of mlflow.get_tracking_uri()'s default, sqlite:///mlflow.db made absolute.
    db = os.path.join(os.path.abspath(workdir), "mlflow.db")
    return "sqlite:///" + posixpath.abspath(urllib.request.pathname2url(db))


def _probe(uri: str) -> str | None:
    """Why the server cannot be used, or None; a 4xx still proves someone is listening."""
    context = None
    if uri.startswith("https://"):
        context = ssl.create_default_context(
            cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        )
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S, context=context
        ):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}" if exc.code >= 500 else None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:
        return _one_line(exc)


def _hf_requirements() -> list[str]:
    # mlflow would otherwise pin torchvision (absent here) and fail; list what serving needs.
    reqs = []
    for dist in (
        "transformers",
        "torch",
        "accelerate",
        "tokenizers",
        "safetensors",
        "sentencepiece",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
    return reqs


def _pyfunc_requirements() -> list[str]:
    # What the pyfunc's code file and the request frames need beyond the HF stack.
    reqs = []
    for dist in ("mlflow", "pandas"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
    return reqs


@contextlib.contextmanager
def _pipeline_impl_compat() -> Iterator[None]:
    """Let mlflow.transformers log a local checkpoint with transformers >= 5.18.

    mlflow (<= 3.17) reads ``pipelines.check_task(task)[1]["impl"].__name__``, but newer
    transformers stores a dotted path string there. Resolving it to the class (importing the
    pipeline module only; no weights) restores what mlflow expects, for this call only.
    """
    try:
        from transformers import pipelines
    except ImportError:
        yield
        return
    original = pipelines.check_task

    def check_task(task: str) -> Any:
        name, meta, options = original(task)
        impl = meta.get("impl") if isinstance(meta, dict) else None
        if isinstance(impl, str):
            module, _, cls = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _local_artifact_dir(location: str | None) -> Path | None:
    """The folder behind a ``file:`` (or plain path) artifact location; None when remote."""
    if not location:
        return None
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        folder = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        folder = Path(location)
    else:
        return None
    return folder if folder.is_dir() else None


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(chunk)
            if block != fb.read(chunk):
                return False
            if not block:
                return True


def share_identical_files(source: Path, copy_root: Path) -> tuple[int, int]:
    """Replace every file under ``copy_root`` that equals a file of ``source`` (same name,
    size and bytes) by a hard link to that file; returns (linked, could not link).

    The swap is atomic (link beside, then rename over), so a reader never sees a missing file.
    """
    by_key: dict[tuple[str, int], list[Path]] = {}
    for file in Path(source).rglob("*"):
        if file.is_file() and not file.is_symlink():
            by_key.setdefault((file.name, file.stat().st_size), []).append(file)
    linked = failed = 0
    for copy in sorted(Path(copy_root).rglob("*")):
        if not copy.is_file() or copy.is_symlink():
            continue
        stat = copy.stat()
        for original in by_key.get((copy.name, stat.st_size), []):
            if os.path.samefile(original, copy):
                break
            if not _same_bytes(original, copy):
                continue
            staged = copy.with_name(f".{copy.name}.polyshift-link")
            try:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
                os.link(original, staged)
                os.replace(staged, copy)
                linked += 1
            except OSError:
                with contextlib.suppress(OSError):
                    staged.unlink()
                failed += 1
            break
    return linked, failed


class Tracker:
    """The training loop's only door to MLflow; see the module docstring for the guarantees."""

    def __init__(
        self,
        *,
        enabled: bool,
        is_rank0: bool,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None,
        run_id: str | None = None,
        log_system_metrics: bool = True,
        registered_model_name: str | None = None,
        workdir: str | os.PathLike = ".",
        defer_models: bool | None = None,
    ) -> None:
        """`defer_models`: upload models at `end` instead of when asked (None: when this
        process is one rank of several, see the module docstring)."""
        self._wanted = bool(enabled and is_rank0)
        self._explicit_uri = tracking_uri
        self._experiment = experiment
        self._run_name = run_name
        self._resume_id = run_id
        self._system_metrics = log_system_metrics
        self._registered_model_name = registered_model_name
        self._workdir = workdir
        self.tracking_uri: str | None = None
        self._run_id: str | None = None
        self._active = False
        self._started = False
        self._broken = False
        self._client: Any = None
        self._params: dict[str, str] = {}
        self._owned_env: set[str] = set()
        self._layer_rows: list[tuple[dict[str, float], int]] = []
        self._defer_models = defer_models
        self._pending: list[Callable[[], Any]] = []  # model uploads waiting for end()

    # -- state ---------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while a run is open and logging works."""
        return self._active

    @property
    def run_id(self) -> str | None:
        """The run's id, kept after end() so a restarted job can resume the same run."""
        return self._run_id

    def _disable(self, what: str, exc: BaseException) -> None:
        self._active = False
        if not self._broken:
            self._broken = True
            _warn(f"{what} ({_one_line(exc)}); training continues without tracking")

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._disable(what + " failed", exc)
            return None

    def _resolve_uri(self) -> str:
        if self._explicit_uri:
            return self._explicit_uri
        return os.environ.get("MLFLOW_TRACKING_URI") or _local_sqlite_uri(self._workdir)

    def _is_local_default(self) -> bool:
        return not self._explicit_uri and not os.environ.get("MLFLOW_TRACKING_URI")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(
        self, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Open (or resume) the run; None means training goes on untracked.

        A tracker holds one run: calling start again only logs the extra params and tags.
        """
        if not self._wanted:
            return None
        if self._started:
            if self._active:
                self.log_params(params or {})
                for key, value in (tags or {}).items():
                    self.set_tag(key, value)
            return self._run_id if self._active else None
        self._started = True
        uri = self._resolve_uri()
        self.tracking_uri = uri
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_DEFAULTS.items():
                if name not in os.environ:
                    os.environ[name] = value
                    self._owned_env.add(name)
            reason = _probe(uri)
            if reason is not None:
                self._broken = True
                _warn(
                    f"tracking server {uri} unreachable ({reason}); "
                    "training continues without tracking"
                )
                return None
        try:
            self._open_run(uri, tags or {})
        except Exception as exc:
            self._disable(f"could not start a run on {uri}", exc)
            return None
        self._active = True
        self.log_params(params or {})
        return self._run_id if self._active else None

    def _open_run(self, uri: str, tags: Mapping[str, str]) -> None:
        import mlflow

        # set_tracking_uri also exports MLFLOW_TRACKING_URI to child processes (data loader
        # workers, launched tools); keep the environment exactly as the user left it.
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        self._client = mlflow.MlflowClient(uri)

        clean_tags = {
            sanitize_key(k): _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()
        }
        system_metrics = self._system_metrics and importlib.util.find_spec("psutil") is not None
        if self._resume_id:
            run = mlflow.start_run(
                run_id=self._resume_id, tags=clean_tags, log_system_metrics=system_metrics
            )
        else:
            run = mlflow.start_run(
                experiment_id=self._experiment_id(),
                run_name=self._run_name,
                tags=clean_tags,
                log_system_metrics=system_metrics,
            )
        self._run_id = run.info.run_id
        self._params = dict(run.data.params)

    def _experiment_id(self) -> str:
        client = self._client
        found = client.get_experiment_by_name(self._experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self._is_local_default():
            # Keep artifacts beside mlflow.db instead of in whatever directory we were run from.
            safe = re.sub(r"[^\w.-]", "_", self._experiment) or "experiment"
            location = Path(os.path.abspath(self._workdir), "mlruns", safe).as_uri()
        try:
            return client.create_experiment(self._experiment, artifact_location=location)
        except Exception:
            found = client.get_experiment_by_name(self._experiment)  # created concurrently
            if found is None:
                raise
            return found.experiment_id

    def _deferring(self) -> bool:
        if self._defer_models is not None:
            return self._defer_models
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _defer(self, what: str, upload: Callable[[], Any]) -> None:
        self._pending.append(upload)
        print(f"mlflow: {what} is uploaded when the run ends", file=sys.stderr, flush=True)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run; also after a failure, so the server shows how training ended.
        Deferred model uploads run first, and only for a run that finished."""
        pending, self._pending = self._pending, []
        if self._active and status == "FINISHED":
            self._defer_models = False
            for upload in pending:
                upload()
        if not self._started or self._run_id is None:
            return
        self._flush_layer_metrics()
        was_active, self._active = self._active, False
        status = status if status in _RUN_STATUSES else "FAILED"
        try:
            import mlflow

            current = mlflow.active_run()
            if current is not None and current.info.run_id == self._run_id:
                mlflow.end_run(status)  # also stops the system metrics thread
            elif was_active:
                self._client.set_terminated(self._run_id, status)
        except Exception as exc:
            if was_active:
                self._disable("ending the run failed", exc)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # -- logging -------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Numbers only; NaN/inf and non-numbers are dropped rather than failing the batch."""
        if not self._active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = {}
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                name = sanitize_key(key)
                batch[name] = Metric(name, number, now, int(step))
        items = list(batch.values())
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i : i + MAX_METRICS_PER_BATCH]
            self._guard("logging metrics", self._client.log_batch, self._run_id, metrics=chunk)

    def log_layer_metrics(self, by_layer: Mapping[int, Mapping[str, float]]) -> None:
        """Curves over depth: each row is logged with its layer as the step (MLflow's x axis).

        Held until the run's model is logged, or the run ends: MLflow links every metric of the
        model's step to its LoggedModel, and layer 30 of a curve is not step 30 of training.
        """
        if self._active:
            self._layer_rows += [(dict(row), int(layer)) for layer, row in by_layer.items()]

    def _flush_layer_metrics(self) -> None:
        rows, self._layer_rows = self._layer_rows, []
        for row, layer in rows:
            self.log_metrics(row, layer)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Batch, truncate, and never re-log: MLflow params are immutable once set.

        On a resumed run a value that differs from the stored one cannot be a param again; it
        goes to a ``changed_param.<key>`` tag so the change stays visible.
        """
        if not self._active or not params:
            return
        from mlflow.entities import Param, RunTag

        new: dict[str, str] = {}
        changed: dict[str, str] = {}
        for key, value in flatten(params).items():
            name = sanitize_key(key)
            text = _truncate(redact(str(value)), MAX_PARAM_VALUE_LENGTH)
            if name not in self._params:
                new[name] = text
            elif self._params[name] != text:
                changed[sanitize_key(f"changed_param.{name}")] = text
        items = list(new.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._guard(
                "logging params",
                self._client.log_batch,
                self._run_id,
                params=[Param(k, v) for k, v in chunk],
            )
            if not self._active:
                return
            self._params.update(chunk)
        tags = list(changed.items())
        for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
            chunk = [RunTag(k, v) for k, v in tags[i : i + MAX_PARAMS_PER_BATCH]]
            self._guard("logging params", self._client.log_batch, self._run_id, tags=chunk)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON, or YAML when artifact_file ends in .yaml/.yml (MLflow picks by extension)."""
        if not self._active:
            return
        try:
            safe = _json_safe(obj)
        except (TypeError, ValueError) as exc:
            _warn(f"{artifact_file} not logged ({_one_line(exc)})")
            return
        client = self._client
        self._guard(f"logging {artifact_file}", client.log_dict, self._run_id, safe, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact (tables, recipes) at artifact_file inside the run."""
        if not self._active:
            return
        client = self._client
        self._guard(
            f"logging {artifact_file}",
            client.log_text,
            self._run_id,
            redact(str(text)),
            artifact_file,
        )

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a whole directory; a missing path is the caller's bug, so it only warns."""
        if not self._active:
            return
        local = os.fspath(path)
        if not os.path.exists(local):
            _warn(f"artifact {local} does not exist; not logged")
            return
        upload = self._client.log_artifacts if os.path.isdir(local) else self._client.log_artifact
        with self._long_requests():
            self._guard(f"logging {local}", upload, self._run_id, local, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        """A mutable run label (e.g. the latest checkpoint path)."""
        if not self._active:
            return
        self._guard(
            f"setting tag {key}",
            self._client.set_tag,
            self._run_id,
            sanitize_key(key),
            _truncate(redact(str(value)), MAX_TAG_VALUE_LENGTH),
        )

    @contextlib.contextmanager
    def _long_requests(self) -> Iterator[None]:
        name = "MLFLOW_HTTP_REQUEST_TIMEOUT"
        if name not in self._owned_env:
            yield
            return
        os.environ[name] = ARTIFACT_REQUEST_TIMEOUT
        try:
            yield
        finally:
            os.environ[name] = HTTP_DEFAULTS[name]

    # -- models --------------------------------------------------------------------------------

    def log_hf_model(
        self,
        export_dir: str | os.PathLike,
        *,
        task: str = "llm/v1/chat",
        name: str = "model",
        step: int = 0,
    ) -> str | None:
        """Log a Hugging Face export directory as an MLflow model without loading its weights.

        The checkpoint files are copied, never deserialised, so a 70B export costs bandwidth
        but not memory; into a local artifact store the copies become hard links to the
        export (`share_identical_files`), so its bytes are stored once. Registers it under ``registered_model_name`` when set and
        returns ``models:/<name>/<version>`` (or ``models:/<model_id>`` when unregistered).
        If the transformers flavor cannot be written (e.g. no tokenizer in the directory), the
        directory is logged as a plain LoggedModel and registered anyway. ``step``: the model
        is the run's output at that step, and the run's metrics of that step are linked to it
        (log it after the final metrics, with the final step).
        """
        if not self._active:
            return None
        if self._deferring():
            self._defer(
                f"the model {export_dir}",
                lambda: self.log_hf_model(export_dir, task=task, name=name, step=step),
            )
            return None
        path = Path(export_dir).resolve()  # absolute: mlflow's hub look-ups then fail offline
        if not (path / "config.json").is_file():
            _warn(f"{path} has no config.json; model not logged")
            return None
        try:
            with self._long_requests():
                try:
                    return self._log_transformers(path, task, name, step)
                except Exception as exc:
                    _warn(
                        f"transformers flavor failed ({_one_line(exc, 200)}); "
                        "logging the checkpoint files instead"
                    )
                return self._guard(
                    "logging the model", self._log_checkpoint_files, path, name, step
                )
        finally:
            self._flush_layer_metrics()

    def log_pyfunc_model(
        self,
        export_dir: str | os.PathLike,
        *,
        python_model: str | os.PathLike,
        code_paths: list[str],
        signature: Any,
        step: int,
        name: str = "model",
    ) -> str | None:
        """Log an export as an MLflow pyfunc defined by a code file (MLflow "models from
        code": the file is copied, nothing is pickled) with the export directory as its
        ``export`` artifact, copied file by file (hard links into a local artifact store, as in
        `log_hf_model`). Registered and linked to the metrics of
        ``step`` like `log_hf_model`."""
        if not self._active:
            return None
        if self._deferring():
            self._defer(
                f"the model {export_dir}",
                lambda: self.log_pyfunc_model(
                    export_dir,
                    python_model=python_model,
                    code_paths=code_paths,
                    signature=signature,
                    step=step,
                    name=name,
                ),
            )
            return None
        path = Path(export_dir).resolve()
        try:
            with self._long_requests():
                return self._guard(
                    "logging the model",
                    self._log_pyfunc,
                    path,
                    str(Path(python_model).resolve()),
                    code_paths,
                    signature,
                    step,
                    name,
                )
        finally:
            self._flush_layer_metrics()

    def _log_pyfunc(
        self,
        path: Path,
        python_model: str,
        code_paths: list[str],
        signature: Any,
        step: int,
        name: str,
    ) -> str:
        import mlflow.pyfunc

        active = mlflow.active_run()
        resume = active is None or active.info.run_id != self._run_id
        with mlflow.start_run(run_id=self._run_id) if resume else contextlib.nullcontext():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=python_model,
                artifacts={"export": str(path)},
                code_paths=code_paths,
                signature=signature,
                pip_requirements=_hf_requirements() + _pyfunc_requirements(),
                registered_model_name=self._registered_model_name,
                step=step,
            )
        self._share_local_copy(info.model_id, path)
        version = info.registered_model_version
        if self._registered_model_name and version is not None:
            return f"models:/{self._registered_model_name}/{version}"
        return info.model_uri

    def _log_transformers(self, path: Path, task: str, name: str, step: int) -> str:
        import mlflow.transformers

        card = None
        if (path / "README.md").is_file():
            from huggingface_hub import ModelCard

            card = ModelCard.load(path / "README.md")
        with _pipeline_impl_compat():
            info = mlflow.transformers.log_model(
                str(path),
                name=name,
                task=task,
                registered_model_name=self._registered_model_name,
                pip_requirements=_hf_requirements(),
                model_card=card,
                run_id=self._run_id,
                step=step,
            )
        self._share_local_copy(info.model_id, path)
        version = info.registered_model_version
        if self._registered_model_name and version is not None:
            return f"models:/{self._registered_model_name}/{version}"
        return info.model_uri

    def _log_checkpoint_files(self, path: Path, name: str, step: int) -> str:
        import mlflow
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        client = self._client
        experiment_id = client.get_run(self._run_id).info.experiment_id
        model = client.create_logged_model(
            experiment_id,
            name=name,
            source_run_id=self._run_id,
            tags={"polyshift.format": "hf-checkpoint"},
        )
        client.log_model_artifacts(model.model_id, str(path))
        self._share_local_copy(model.model_id, path)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(self._run_id, [LoggedModelOutput(model.model_id, step=step)])
        self._link_metrics(model.model_id, step)
        if not self._registered_model_name:
            return f"models:/{model.model_id}"
        version = mlflow.register_model(f"models:/{model.model_id}", self._registered_model_name)
        return f"models:/{self._registered_model_name}/{version.version}"

    def _share_local_copy(self, model_id: str | None, export: Path) -> None:
        """One copy of the export on disk: a local artifact store gets hard links, not bytes.

        MLflow copies the export into the model's artifacts. When those lie on this machine
        (``file:`` artifact location: the default ``./mlflow.db`` + ``./mlruns``, or a server
        without artifact proxying on a shared filesystem), each copied file that equals an
        export file is replaced by a hard link to it: the bytes are stored once, yet either
        side survives deleting the other. A remote artifact store keeps its upload.
        """
        if model_id is None:
            return
        try:
            root = _local_artifact_dir(self._client.get_logged_model(model_id).artifact_location)
            if root is None:
                return
            linked, failed = share_identical_files(export, root)
        except Exception as exc:  # the model is logged; only the disk saving is lost
            _warn(f"export stored twice ({_one_line(exc)})")
            return
        if failed:
            _warn(
                f"{failed} export file(s) stored twice: cannot hard-link {export} into {root} "
                f"({linked} linked); keep the run directory and MLflow's artifact root on one "
                "filesystem to store them once"
            )

    def _link_metrics(self, model_id: str, step: int) -> None:
        """The run's metrics of ``step``, logged again with ``model_id``: what MLflow's own
        ``log_model(step=...)`` does, for a model created by hand."""
        from mlflow.entities import Metric

        client = self._client
        linked = [
            Metric(
                m.key,
                m.value,
                m.timestamp,
                m.step,
                model_id,
                m.dataset_name,
                m.dataset_digest,
                self._run_id,
            )
            for key in client.get_run(self._run_id).data.metrics
            for m in client.get_metric_history(self._run_id, key)
            if m.step == step and m.model_id is None
        ]
        for i in range(0, len(linked), MAX_METRICS_PER_BATCH):
            client.log_batch(self._run_id, metrics=linked[i : i + MAX_METRICS_PER_BATCH])
