"""rollbox's Modal helper: creates and terminates the Modal sandboxes that run `rollbox serve`.

rollbox embeds this file and runs it with `python3 -c`, then drives it over JSON lines: one
request per line on stdin, one answer per line on stdout. Logs go to stderr.

  {"op": "configure", "config": {...}}      -> {"ok": true, "plan": {...}}
  {"op": "create", "tokens": ["...", ...]}  -> {"ok": true, "sandboxes": [{"id": ..., "url": ...}, ...]}
  {"op": "terminate", "ids": ["sb-...", ...]} -> {"ok": true, "terminated": [...], "errors": [...]}
  {"op": "terminate_all"}                   -> {"ok": true, "terminated": [...], "errors": [...]}

A request that fails answers {"ok": false, "error": "..."}. `create` is all or nothing: if one
sandbox of the request fails, the others it made are terminated before it answers.

Leaked, billed sandboxes are the failure this helper exists to prevent. Whatever ends it -
stdin closing (rollbox exited or was killed), SIGTERM, SIGHUP, SIGINT, an exception - it
terminates every sandbox it created and has not terminated yet before it exits. Each sandbox
also carries a lifetime cap (`timeout`), Modal's own backstop.

With --dry-run it never imports modal: `configure` answers with the plan (every SDK call it
would make, in order) and `create` is refused.
"""

import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def log(message):
    """A line for rollbox's log. Never raises: when rollbox was killed its end of the pipe is
    gone, and the clean-up that logs must still terminate every sandbox."""
    try:
        print(f"[rollbox modal helper] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def image_steps(config):
    """The image as a chain of modal.Image calls: (method, args, kwargs)."""
    image = config["image"]
    if image.get("registry"):
        # A task's own image (SWE-bench's per-instance images): used as it is, the static
        # rollbox binary added on top.
        steps = [("from_registry", [image["registry"]], {})]
    else:
        steps = [("debian_slim", [], {"python_version": image["python_version"]})]
        if image["apt_packages"]:
            steps.append(("apt_install", list(image["apt_packages"]), {}))
    # copy=True bakes the binary into a layer, so the chmod step can run after it.
    steps.append(("add_local_file", [image["binary"], image["remote_binary"]], {"copy": True}))
    steps.append(("run_commands", [f"chmod 755 {image['remote_binary']}"], {}))
    return steps


def sandbox_kwargs(config):
    """Keyword arguments of modal.Sandbox.create besides app, image and secrets."""
    kwargs = {"encrypted_ports": [config["port"]], "timeout": config["timeout_secs"]}
    if config.get("cpu") is not None:
        kwargs["cpu"] = config["cpu"]
    if config.get("memory_mib") is not None:
        kwargs["memory"] = config["memory_mib"]
    return kwargs


def describe_call(name, args, kwargs):
    return {"call": name, "args": args, "kwargs": kwargs}


def build_plan(config):
    """Every SDK call the helper makes, in order, as data: what --dry-run prints."""
    return {
        "app": describe_call("modal.App.lookup", [config["app_name"]], {"create_if_missing": True}),
        "image": [describe_call(("modal.Image." if i == 0 else ".") + name, args, kwargs) for i, (name, args, kwargs) in enumerate(image_steps(config))],
        "secret_per_sandbox": describe_call("modal.Secret.from_dict", [{config["token_env"]: "<a fresh random token per sandbox>"}], {}),
        "sandbox": describe_call("modal.Sandbox.create", list(config["command"]), dict(sandbox_kwargs(config), app="<the app>", image="<the image>", secrets=["<the secret>"])),
        "tunnel": describe_call("sandbox.tunnels", [], {"timeout": config["tunnel_timeout_secs"]}),
        "url": f"sandbox.tunnels()[{config['port']}].url",
        "on_release_shutdown_or_exit": describe_call("sandbox.terminate", [], {}),
    }


class Helper:
    def __init__(self, dry_run):
        self.dry_run = dry_run
        self.config = None
        self.modal = None
        self.app = None
        self.image = None
        self.created = {}
        self.lock = threading.Lock()

    def handle(self, request):
        op = request.get("op")
        if op == "configure":
            return self.configure(request["config"])
        if self.config is None:
            raise RuntimeError("the helper is not configured: send a configure request first")
        if op == "create":
            return self.create(request["tokens"])
        if op == "terminate":
            return self.terminate(request["ids"])
        if op == "terminate_all":
            return self.terminate_all()
        raise ValueError(f"unknown op {op!r}; the ops are configure, create, terminate, terminate_all")

    def configure(self, config):
        plan = build_plan(config)
        self.config = config
        if self.dry_run:
            return {"ok": True, "plan": plan, "dry_run": True}
        try:
            import modal
        except ImportError as error:
            raise RuntimeError(f"{sys.executable} cannot import modal ({error}): install it with `pip install modal` and log in with `modal setup`, or point --modal-python at a Python that has it") from error
        self.modal = modal
        self.app = modal.App.lookup(config["app_name"], create_if_missing=True)
        steps = image_steps(config)
        name, args, kwargs = steps[0]
        image = getattr(modal.Image, name)(*args, **kwargs)
        for name, args, kwargs in steps[1:]:
            image = getattr(image, name)(*args, **kwargs)
        self.image = image
        return {"ok": True, "plan": plan, "dry_run": False}

    def create(self, tokens):
        if self.dry_run:
            raise RuntimeError("dry run: no sandbox is created")
        with ThreadPoolExecutor(max_workers=max(1, min(len(tokens), 16))) as pool:
            futures = [pool.submit(self.create_one, token) for token in tokens]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append((future.result(), None))
                except Exception as error:  # noqa: BLE001 - every failure is reported
                    outcomes.append((None, error))
        failures = [error for _, error in outcomes if error is not None]
        if failures:
            made = [sandbox["id"] for sandbox, _ in outcomes if sandbox is not None]
            self.terminate(made)
            raise RuntimeError(f"{len(failures)} of {len(tokens)} sandboxes failed to start (the others were terminated): {failures[0]!r}")
        return {"ok": True, "sandboxes": [sandbox for sandbox, _ in outcomes]}

    def create_one(self, token):
        config = self.config
        secret = self.modal.Secret.from_dict({config["token_env"]: token})
        sandbox = self.modal.Sandbox.create(*config["command"], app=self.app, image=self.image, secrets=[secret], **sandbox_kwargs(config))
        # Remembered before anything else can fail, so it is terminated whatever happens next.
        with self.lock:
            self.created[sandbox.object_id] = sandbox
        log(f"created sandbox {sandbox.object_id}")
        tunnel = sandbox.tunnels(timeout=config["tunnel_timeout_secs"])[config["port"]]
        return {"id": sandbox.object_id, "url": tunnel.url}

    def terminate(self, ids):
        terminated, errors = [], []
        for sandbox_id in ids:
            with self.lock:
                sandbox = self.created.pop(sandbox_id, None)
            if sandbox is None:
                errors.append(f"{sandbox_id}: not created by this helper, or already terminated")
                continue
            try:
                sandbox.terminate()
                terminated.append(sandbox_id)
                log(f"terminated sandbox {sandbox_id}")
            except Exception as error:  # noqa: BLE001 - keep going: the others must still end
                errors.append(f"{sandbox_id}: {error!r}")
        return {"ok": not errors, "terminated": terminated, "errors": errors, **({"error": "; ".join(errors)} if errors else {})}

    def terminate_all(self):
        with self.lock:
            ids = list(self.created)
        return self.terminate(ids)


def exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv):
    helper = Helper(dry_run="--dry-run" in argv[1:])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, exit_on_signal)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = helper.handle(json.loads(line))
            except Exception as error:  # noqa: BLE001 - answered, never fatal
                answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(answer), flush=True)
    finally:
        # No signal may cut the clean-up short.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if helper.created:
            log(f"stdin closed or signalled: terminating {len(helper.created)} sandboxes")
            answer = helper.terminate_all()
            for error in answer["errors"]:
                log(f"failed to terminate {error}")


if __name__ == "__main__":
    main(sys.argv)
