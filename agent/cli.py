"""``fedsrd-agent``: take part in a federation from a client site.

    fedsrd-agent --server URL --token-file FILE --data PATH [--model PATH_OR_ID]
                 [--state-dir DIR] [--device cuda|cpu]

The token: ``--token-file`` (a file only the site's user can read) or the environment
(``FEDSRD_AGENT_TOKEN``); ``--token TOKEN`` works too, but any user of the machine sees a
command line (``ps``).

Every option can also come from the environment (``FEDSRD_AGENT_SERVER``, ...) or a config
file (``--config agent.toml`` or ``.json``, keys named like the options); flags win over the
environment, which wins over the file. The agent checks its base model against the run's
fingerprint and its data file before anything else, then polls for rounds, keeps the global
state in sync (checking every digest), trains, and uploads sparse updates: never data or
prompts. It keeps its state in the state directory, so a killed agent restarts where it was
and re-sends an upload the server had not acknowledged. Exit status: 0 when the run
completes; 3 when it is cancelled or this client is revoked; 1 for anything else, with one
line saying why.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import ssl
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from agent.client import AgentClient, RetryBudgetExceededError, ServerError
from agent.state import Pending, StateDir
from fedsrd_core.finite import json_finite

log = logging.getLogger("fedsrd-agent")
ENV_PREFIX = "FEDSRD_AGENT_"


class AgentError(Exception):
    """A condition that ends the agent with one line and ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("server", {"help": "the control plane's URL, e.g. https://fedsrd.example.org"}),
    ("token", {"help": "this site's client token (visible in `ps`: prefer --token-file)"}),
    ("token-file", {"help": "file holding the client token (given once at enrollment)"}),
    ("data", {"help": "local training data: JSONL (instruction/input/output) or plain text"}),
    ("model", {"help": "base model: local directory or cached hub id (default: the run's)"}),
    ("state-dir", {"default": "fedsrd-agent-state", "help": "where the agent keeps its state"}),
    ("device", {"choices": ["cuda", "cpu"], "help": "training device (default: cuda if any)"}),
    ("model-cache", {"default": "var/models", "help": "where the project's tiny model is built"}),
    ("poll-wait", {"type": float, "default": 30.0, "help": "long-poll seconds"}),
    (
        "startup-timeout",
        {"type": float, "default": 30.0, "help": "give up if the server is unreachable at start"},
    ),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsrd-agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML or JSON file with any of these options")
    for name, kw in OPTIONS:
        p.add_argument(f"--{name}", **kw)
    p.add_argument("--log-json", action="store_true", help="structured logs (JSON lines)")
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="let --model fetch a hub id that is not in the local Hugging Face cache "
        "(off: the agent never goes to the Hub)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    defaults: dict[str, Any] = {}
    if first.config:
        path = Path(first.config)
        try:
            text = path.read_text()
            loaded = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot read config file {path}: {e}") from e
        defaults.update({k.replace("-", "_"): v for k, v in loaded.items()})
    for name, _ in OPTIONS:
        env = os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))
        if env is not None:
            defaults[name.replace("-", "_")] = env
    if os.environ.get(ENV_PREFIX + "LOG_JSON"):
        defaults["log_json"] = True
    if os.environ.get(ENV_PREFIX + "ALLOW_DOWNLOAD"):
        defaults["allow_download"] = True
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.token_file:
        if args.token:
            raise AgentError("give the token once: --token or --token-file, not both")
        args.token = _read_token(Path(args.token_file))
    for required in ("server", "token", "data"):
        if not getattr(args, required):
            alt = " or --token-file" if required == "token" else ""
            raise AgentError(
                f"--{required}{alt} is required "
                f"(or {ENV_PREFIX}{required.upper()}, or the config file)"
            )
    args.poll_wait = float(args.poll_wait)
    args.startup_timeout = float(args.startup_timeout)
    return args


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AgentError(f"cannot read the token file {path}: {e}") from e
    if not token or any(c.isspace() for c in token):
        raise AgentError(f"the token file {path} must hold the token alone, on one line")
    return token


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": round(record.created, 3), "level": record.levelname.lower()}
        doc["message"] = record.getMessage()
        doc.update(getattr(record, "fields", {}))
        # A diverged loss is logged as null: ``NaN`` is not JSON, and log shippers refuse it.
        return json.dumps(json_finite(doc))


class _TextFormatter(logging.Formatter):
    """``HH:MM:SS message key=value ...``: the same fields as the JSON lines carry."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {
            k: v for k, v in getattr(record, "fields", {}).items() if k != "event" and v is not None
        }
        return " ".join([line, *(f"{k}={_text_value(v)}" for k, v in fields.items())])


def _text_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return json.dumps(text) if not text or any(c.isspace() for c in text) else text


def setup_logging(json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def event(message: str, **fields: Any) -> None:
    log.info(message, extra={"fields": {"event": message.split(":")[0], **fields}})


def _check_server_url(server: str) -> str:
    """The server's base URL, or an AgentError saying at once what is wrong with it (before,
    a wrong path or scheme was retried for the whole startup timeout)."""
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AgentError(f"--server {server!r} is not an http:// or https:// URL")
    if parts.path.rstrip("/") or parts.query or parts.fragment:
        base = f"{parts.scheme}://{parts.netloc}"
        raise AgentError(
            f"--server takes the server's base URL ({base}), not a path on it ({server})"
        )
    return server.rstrip("/")


def _tls_mismatch(http: httpx.Client, server: str) -> str | None:
    """One probe: a TLS handshake that fails (an https:// URL for a plain-HTTP server) or a
    plain request a TLS server refuses is a wrong URL, not a server that is starting."""
    try:
        r = http.get("/healthz", timeout=10.0)
    except httpx.TransportError as e:
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, ssl.SSLError):
                return (
                    f"TLS handshake with {server} failed ({cause.reason or cause}): is it http://?"
                )
            cause = cause.__cause__ or cause.__context__
        return None  # refused, timed out, ...: perhaps still starting; retried as before
    if server.startswith("http://") and r.status_code == 400 and "https" in r.text.lower():
        return f"{server} answers plain HTTP with 400 ({r.text.strip()[:80]}): is it https://?"
    return None


def _connect(args: argparse.Namespace) -> tuple[AgentClient, dict[str, Any]]:
    server = _check_server_url(args.server)
    http = httpx.Client(base_url=server, timeout=60.0)
    if (why := _tls_mismatch(http, server)) is not None:
        raise AgentError(why)
    client = AgentClient(http, args.token, 0, retry_for=args.startup_timeout)
    try:
        client.whoami()  # learns the run of this token (sets client.run_id)
    except RetryBudgetExceededError as e:
        raise AgentError(
            f"cannot reach a FedSRD server at {args.server} "
            f"(tried for {args.startup_timeout:.0f} s): {e}"
        ) from e
    except ServerError as e:
        if e.status == 401:
            raise AgentError(f"the server refused the token: {e.detail}") from e
        if e.status == 410:
            raise AgentError(f"this client was revoked: {e.detail}", 3) from e
        raise AgentError(f"{args.server} is not a FedSRD server ({e})") from e
    # From here on, a server that goes away is waited for, never given up on.
    client.retry_for = None
    return client, client.run_info()


def _load_data(path: str) -> list[Any]:
    from fedsrd_core.data import DataError, load_examples

    try:
        examples = load_examples(path)
    except DataError as e:  # names the file (and the line)
        raise AgentError(f"cannot use data file: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AgentError(f"cannot use data file {path}: {e}") from e
    if not examples:
        raise AgentError(f"data file {path} holds no examples")
    return examples


def _load_model(args: argparse.Namespace, info: dict[str, Any]) -> tuple[Any, Any]:
    from fedsrd_core.modeling import ModelLoadError, load_causal_lm, model_fingerprint

    name = args.model or info["base_model"]
    if name == "tiny":
        from fedsrd_core.tiny_assets import tiny_model_path

        name = str(tiny_model_path(args.model_cache))
    try:
        model, tokenizer = load_causal_lm(
            name, device=args.device, allow_download=bool(args.allow_download)
        )
    except ModelLoadError as e:
        raise AgentError(f"cannot load the base model: {e}") from e
    fingerprint = model_fingerprint(model)
    if fingerprint != info["model_fingerprint"]:
        raise AgentError(
            f"model mismatch: {name} has fingerprint {fingerprint[:16]}..., the run trains "
            f"{info['base_model']} ({info['model_fingerprint'][:16]}...)"
        )
    return model, tokenizer


class _Progress:
    """A progress bar on a terminal, a log line per step otherwise; heartbeats to the
    server at most every 2 s (and at the last step) so it knows training is alive."""

    def __init__(self, client: AgentClient, number: int, steps: int, bar: bool) -> None:
        self.client, self.number, self.steps = client, number, steps
        self.t0 = time.monotonic()
        self.last_beat = 0.0
        self.samples = 0
        self.bar: Any = None
        if bar:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self.bar = tqdm(total=steps, desc=f"round {number}", unit="step", leave=False)

    def __call__(self, step: int, loss: float, samples: int) -> None:
        self.samples = samples
        now = time.monotonic()
        rate = samples / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.1f}")
        else:
            event("step", round=self.number, step=step, steps=self.steps, loss=loss)
        if now - self.last_beat >= 2.0 or step == self.steps:
            self.last_beat = now
            self.client.heartbeat(
                self.number, step, steps=self.steps, loss=loss, samples_per_second=rate
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _WaitLog:
    """Says that the agent is waiting (for a launch, for the next round) when that starts or
    its reason changes, then once every ``every`` seconds: never silent for minutes, never a
    line per poll."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.key: tuple[Any, ...] | None = None
        self.last = 0.0

    def __call__(self, answer: dict[str, Any]) -> None:
        key = (answer.get("run_status"), answer.get("reason"), answer.get("round"))
        now = time.monotonic()
        if key != self.key or now - self.last >= self.every:
            status = answer.get("run_status")
            event(
                "waiting for the run to be launched" if status == "created" else "waiting",
                run_status=status,
                round=answer.get("round"),
                reason=answer.get("reason"),
            )
            self.key, self.last = key, now

    def reset(self) -> None:
        self.key = None


def _on_step(progress: _Progress, per_step: int, step: int, loss: float) -> None:
    progress(step, loss, step * per_step)


def run_agent(args: argparse.Namespace) -> int:
    client, info = _connect(args)
    examples = _load_data(args.data)
    # Building or loading a model can take minutes: say so when it takes more than a few
    # seconds (a model that fails at once still ends in its one error line).
    notice = threading.Timer(
        5.0, event, ("loading model",), {"model": args.model or info["base_model"]}
    )
    notice.daemon = True
    notice.start()
    try:
        model, tokenizer = _load_model(args, info)
    finally:
        notice.cancel()
    # The first line an agent prints: every setup check has passed by now.
    event(
        "connected",
        run=info["run_id"],
        client=info["client_name"],
        examples=len(examples),
        model=args.model or info["base_model"],
    )

    from agent.participant import DigestMismatchError, Participant, StalePlanError
    from fedsrd_core.state import state_digest

    part = Participant(client, model, tokenizer, examples, info)
    store = StateDir(args.state_dir)
    st, factors = store.load(info["run_id"], info["client_id"], part.layout, part.rank)
    part.state, part.have_round = factors, st.have_round

    def save(with_factors: bool) -> None:
        st.have_round = part.have_round
        st.digest = state_digest(part.state) if part.state is not None else None
        store.save(st, part.state if with_factors else None)

    if st.pending is not None:
        blob = store.pending_blob()
        p = st.pending
        if blob is not None:
            try:
                client.upload(
                    p.round, p.base_round, blob, num_samples=p.num_samples, train_loss=p.train_loss
                )
                st.rounds_trained.append(p.round)
                event("re-sent unacknowledged upload", round=p.round)
            except ServerError as e:
                if e.status not in (409, 410):
                    raise
                event("dropped unacknowledged upload", round=p.round, reason=str(e.detail))
        st.pending = None
        save(False)

    bar = sys.stderr.isatty() and not args.log_json
    waiting = _WaitLog()
    while True:
        answer = client.poll(part.have_round if part.state is not None else None, args.poll_wait)
        action = answer["action"]
        if action == "wait":
            waiting(answer)
            continue
        waiting.reset()
        if action == "done":
            plan = client.sync(part.have_round if part.state is not None else None)
            if plan["snapshot"] is not None or plan["deltas"]:
                part.sync(plan)
                save(True)
            event("run completed", round=part.have_round, digest=st.digest)
            return 0
        if action == "stop":
            raise AgentError(f"the run stopped: {answer.get('reason') or answer['run_status']}", 3)
        if action != "train":
            continue
        number, base = int(answer["round"]), int(answer["base_round"])
        if answer.get("sync"):
            plan = answer["sync"]
            # Said before it starts: a snapshot can take minutes on a slow link.
            event(
                "downloading",
                to_round=plan["to_round"],
                snapshot_round=plan["snapshot"]["round"] if plan["snapshot"] else None,
                deltas=len(plan["deltas"]),
                bytes=plan["bytes"],
            )
            try:
                part.sync(plan)
            except DigestMismatchError as e:
                event("state mismatch, reloading a snapshot", detail=str(e))
                part.state, part.have_round = None, -1
                save(False)
                continue
            except StalePlanError as e:  # the progress made is kept (Participant.sync)
                event("sync plan outdated, asking again", detail=str(e), round=part.have_round)
                save(part.state is not None)
                continue
            save(True)
        assert part.state is not None
        event("training", round=number, steps=part.train.steps)
        progress = _Progress(client, number, part.train.steps, bar)
        samples_per_step = part.train.batch_size * part.train.grad_accum
        try:
            blob, loss = part.train_round(
                number, on_step=functools.partial(_on_step, progress, samples_per_step)
            )
        finally:
            progress.close()
        # Saved before it is sent: a kill from here on re-sends this blob, never retrains.
        st.pending = Pending(number, base, len(examples), loss, hashlib.sha256(blob).hexdigest())
        store.save_pending(blob)
        save(False)
        try:
            client.upload(number, base, blob, num_samples=len(examples), train_loss=loss)
        except ServerError as e:
            if e.status != 409:
                raise
            event("upload not taken", round=number, reason=str(e.detail))
        else:
            st.rounds_trained.append(number)
            event("uploaded", round=number, bytes=len(blob), loss=loss)
        st.pending = None
        save(False)


def main(argv: Sequence[str] | None = None) -> int:
    # Quiet libraries: errors end in one line, and logs are the agent's own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        args = parse_args(argv)
        if not args.allow_download:  # read when huggingface_hub is imported (later, lazily)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        setup_logging(args.log_json)
        return run_agent(args)
    except AgentError as e:
        print(f"fedsrd-agent: {e}", file=sys.stderr)
        return e.code
    except ServerError as e:
        code = 3 if e.status == 410 else 1
        print(f"fedsrd-agent: the server refused a request: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("fedsrd-agent: interrupted; the state directory keeps its progress", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
