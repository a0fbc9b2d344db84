"""A stand-in for Modal's Python SDK, used by rollbox's tests because Modal cannot be reached
from the test machine.

It implements just the calls rollbox's Modal helper makes, records each one (as a JSON line in
the file named by `stand_in.json` beside this package), and its Sandbox.create starts a real
local `rollbox serve` on loopback with the environment the sandbox's secrets carry. The URL its
tunnel returns therefore leads to a real server that checks the real per-sandbox token.
Everything about Modal itself (auth, image builds, scheduling, tunnels) is NOT exercised.
"""

import itertools
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "..", "stand_in.json")) as settings_file:
    SETTINGS = json.load(settings_file)

_numbers = itertools.count(1)


def record(call, **details):
    with open(SETTINGS["record"], "a") as log:
        log.write(json.dumps({"call": call, **details}) + "\n")


class App:
    @staticmethod
    def lookup(name, create_if_missing=False):
        record("App.lookup", name=name, create_if_missing=create_if_missing)
        return App()


class Image:
    @staticmethod
    def debian_slim(python_version=None):
        record("Image.debian_slim", python_version=python_version)
        return Image()

    @staticmethod
    def from_registry(tag):
        record("Image.from_registry", tag=tag)
        image = Image()
        image.tag = tag
        return image

    def apt_install(self, *packages):
        record("Image.apt_install", packages=list(packages))
        return self

    def add_local_file(self, local_path, remote_path, copy=False):
        record("Image.add_local_file", local_path=local_path, remote_path=remote_path, copy=copy)
        return self

    def run_commands(self, *commands):
        record("Image.run_commands", commands=list(commands))
        return self


class Secret:
    def __init__(self, env):
        self.env = env

    @staticmethod
    def from_dict(env):
        record("Secret.from_dict", names=sorted(env))
        return Secret(dict(env))


class _Tunnel:
    def __init__(self, url):
        self.url = url


class Sandbox:
    def __init__(self, object_id, process, url, ports):
        self.object_id = object_id
        self._process = process
        self._url = url
        self._ports = ports

    @staticmethod
    def create(*args, app=None, image=None, secrets=(), encrypted_ports=(), timeout=None, **kwargs):
        number = next(_numbers)
        if number == SETTINGS.get("fail_on_create_number"):
            raise RuntimeError("the stand-in refuses this sandbox")
        object_id = f"sb-stand-in-{os.getpid()}-{number}"
        record("Sandbox.create", id=object_id, args=list(args), image=getattr(image, "tag", None), encrypted_ports=list(encrypted_ports), timeout=timeout, other_kwargs=sorted(kwargs))
        env = dict(os.environ)
        for secret in secrets:
            env.update(secret.env)
        # Its workspaces go in the test's own folder, removed with it: terminate() kills the
        # server as Modal would, so it cannot remove them itself.
        env["TMPDIR"] = os.path.join(HERE, "..", "..")
        process = subprocess.Popen(
            # `serve_args` (optional): what a test needs the server to run, such as the process
            # backend for SWE tasks; the real command's other flags name Modal's own paths.
            [SETTINGS["binary"], "--quiet", "serve", "--listen", "127.0.0.1:0", *SETTINGS.get("serve_args", [])],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )
        url = json.loads(process.stdout.readline())["url"]
        return Sandbox(object_id, process, url, list(encrypted_ports))

    def tunnels(self, timeout=50):
        record("Sandbox.tunnels", id=self.object_id, timeout=timeout)
        return {port: _Tunnel(self._url) for port in self._ports}

    def terminate(self):
        record("Sandbox.terminate", id=self.object_id)
        # Modal ends the container outright; so does the stand-in.
        self._process.kill()
        self._process.wait(timeout=60)
