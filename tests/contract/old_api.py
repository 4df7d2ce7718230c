#!/usr/bin/env python3
"""The old device-api against `tope-ota serve`: a contract suite written from the old service's
API description (SPEC section 6 and the old examples), not from tope-ota's code.

Standard library only. Usage: old_api.py /path/to/tope-ota. It builds its own device in a temp
dir (a version 1.0.0, a fake systemctl, a package server, a slow callback receiver), starts
`tope-ota serve` on a free loopback port, and does what device-api did: download, poll
/progress, update, the error cases, while receiving callbacks 300 ms slow (within the old
500 ms budget). Exit 0 when every check passed; the first failed check is printed.
"""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile

CALLBACK_DELAY = 0.3


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok - {what}")


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that closes a kept-alive connection (a tope-ota process exiting) is normal.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve_in_thread(handler):
    srv = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def package_server(files):
    """Serves each name in `files` (bytes) with a Content-Length."""

    class H(Quiet):
        def do_GET(self):
            name = self.path.lstrip("/")
            if name not in files:
                self.send_response(404)
                self.end_headers()
                return
            body = files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return serve_in_thread(H)


def callback_receiver(bodies):
    """device-api's report endpoint: records each JSON body, answers 200 after 300 ms."""

    class H(Quiet):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(n)
            try:
                bodies.append(json.loads(raw))
            except ValueError:
                bodies.append({"unparsable": raw.decode(errors="replace")})
            time.sleep(CALLBACK_DELAY)
            out = b'{"code":200,"msg":"success","data":null}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    return serve_in_thread(H)


def make_package(version, files):
    manifest = {
        "version": version,
        "modules": [
            {"name": "api", "src": "bin/device-api", "dst": "bin/device-api",
             "process_name": "device-api", "restart_order": 1},
            {"name": "ui", "src": "bin/printer-ui", "dst": "bin/printer-ui",
             "process_name": "printer-ui", "restart_order": 2},
        ],
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest))
        for path, data in files.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = 0o100755 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


FAKE_SYSTEMCTL = """#!/bin/sh
here=$(dirname "$0")
mkdir -p "$here/units"
echo "$*" >> "$here/calls"
case "$1" in
  start) touch "$here/units/$2" ;;
  stop) rm -f "$here/units/$2" ;;
  is-active) if [ -e "$here/units/$2" ]; then echo active; exit 0; else echo inactive; exit 3; fi ;;
esac
exit 0
"""


def corrupt(data):
    """The same length, one byte in the middle changed."""
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]


class Api:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, raw=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        env = json.loads(text)
        if not (set(env) >= {"code", "msg", "data"} and env["code"] == status):
            raise AssertionError(f"{method} {path}: not the envelope {{code,msg,data}} with "
                                 f"code = HTTP status {status}: {env}")
        return status, env

    def progress(self):
        status, env = self.call("GET", "/api/v1.0/progress")
        assert status == 200 and env["msg"] == "success", env
        d = env["data"]
        assert {"stage", "progress", "message", "error"} <= set(d), d
        return d

    def wait(self, stages, secs=60):
        until = time.time() + secs
        while True:
            d = self.progress()
            if d["stage"] in stages:
                return d
            if time.time() > until:
                raise AssertionError(f"waited {secs}s for {stages}: {d}")
            time.sleep(0.1)


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="old-api-")
    versions = os.path.join(tmp, "versions")
    v1 = os.path.join(versions, "v1.0.0", "bin")
    os.makedirs(v1)
    for prog in ("device-api", "printer-ui"):
        with open(os.path.join(v1, prog), "w") as f:
            f.write(f"#!/bin/sh\necho {prog} 1.0.0\n")
        os.chmod(os.path.join(v1, prog), 0o755)
    os.symlink("v1.0.0", os.path.join(versions, "current"))
    sc_dir = os.path.join(tmp, "systemctl")
    os.makedirs(os.path.join(sc_dir, "units"))
    for unit in ("device-api", "printer-ui"):
        open(os.path.join(sc_dir, "units", unit), "w").close()
    systemctl = os.path.join(sc_dir, "systemctl")
    with open(systemctl, "w") as f:
        f.write(FAKE_SYSTEMCTL)
    os.chmod(systemctl, 0o755)

    v2_files = {"bin/device-api": b"#!/bin/sh\necho device-api 2.0.0\n",
                "bin/printer-ui": b"#!/bin/sh\necho printer-ui 2.0.0\n"}
    v2 = make_package("2.0.0", v2_files)
    pkgs = package_server({"tope-2.0.0.zip": v2, "corrupt.zip": corrupt(v2)})
    pkg_base = f"http://127.0.0.1:{pkgs.server_address[1]}"
    callbacks = []
    receiver = callback_receiver(callbacks)
    report_url = f"http://127.0.0.1:{receiver.server_address[1]}/api/v1.0/ota/report"

    env = dict(os.environ)
    env.update({
        "TOPE_OTA_STATE_DIR": os.path.join(tmp, "state"),
        "TOPE_OTA_VERSIONS_DIR": versions,
        "TOPE_OTA_REPORT_URL": report_url,
        "TOPE_OTA_SYSTEMCTL": systemctl,
        "TOPE_OTA_GUI": os.path.join(tmp, "no-ota-gui"),
        "TOPE_OTA_KEYS_DIR": os.path.join(tmp, "keys.d"),
        "TOPE_OTA_INHIBIT_DIR": os.path.join(tmp, "inhibit.d"),
        "TOPE_OTA_SETTLE_MS": "200",
    })
    serve = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0"], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline().strip()
        check(line.startswith("listening on "), f"serve started ({line!r})")
        api = Api("http://" + line.split()[-1])
        run(api, pkg_base, v2, versions, callbacks, lambda: heal(binary, env))
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    print("all checks passed")


def heal(binary, env):
    """The next writer, as the heal timer runs it: once the worker has exited (heal is BUSY
    while it holds the lock), it sends the stage the worker could not deliver in time."""
    until = time.time() + 30
    while True:
        r = subprocess.run([binary, "heal"], env=env, capture_output=True, text=True)
        if r.returncode != 75 or time.time() > until:
            break
        time.sleep(0.05)
    check(r.returncode == 0, f"heal after the worker: {r.returncode} {r.stderr}")


def run(api, pkg_base, v2, versions, callbacks, next_writer):
    d = api.progress()
    check(d["stage"] == "idle" and d["error"] is None, "GET /progress: idle before anything")

    # The error cases the old service answered.
    st, env = api.call("POST", "/api/v1.0/update", {"version": "2.0.0"})
    check(st == 400 and env["msg"].startswith("NO_PACKAGE"), "update with nothing downloaded: 400 NO_PACKAGE")
    st, env = api.call("POST", "/api/v1.0/download", raw=b"{not json")
    check(st == 400 and env["msg"].startswith("INVALID_REQUEST"), "download with bad JSON: 400")
    st, env = api.call("POST", "/api/v1.0/download", {"version": "2.0.0"})
    check(st == 400 and env["msg"].startswith("INVALID_REQUEST"), "download with fields missing: 400")
    st, env = api.call("GET", "/api/v1.0/nothing")
    check(st == 404, "unknown path: 404 in the envelope")
    st, env = api.call("GET", "/api/v1.0/download")
    check(st == 405, "wrong method: 405 in the envelope")

    # A corrupt package: MD5_MISMATCH, reported as a failure.
    md5 = hashlib.md5(v2).hexdigest()
    bad = {"version": "2.0.0", "package_url": pkg_base + "/corrupt.zip", "package_name": "corrupt.zip",
           "package_size": len(v2), "package_md5": md5}
    st, env = api.call("POST", "/api/v1.0/download", bad)
    check(st == 200, "download of a corrupt package starts: 200")
    d = api.wait({"failed"})
    check(d["error"] == "MD5_MISMATCH", "the corrupt package fails with MD5_MISMATCH")
    until = time.time() + 10
    while not any(b.get("code") == 500 for b in callbacks) and time.time() < until:
        time.sleep(0.1)
    fail = [b for b in callbacks if b.get("code") == 500]
    check(len(fail) == 1 and fail[0]["msg"].startswith("MD5_MISMATCH")
          and fail[0]["data"]["stage"] == "failed" and fail[0].get("stage") == "failed",
          "one failure callback: code 500, msg MD5_MISMATCH, stage failed (top level and data)")
    del callbacks[:]

    # The real package, as the old device-api sent it (a field the old model ignored, the
    # size as the old model coerced it).
    req = {"version": "2.0.0", "package_url": pkg_base + "/tope-2.0.0.zip",
           "package_name": "tope-2.0.0.zip", "package_size": str(len(v2)), "package_md5": md5,
           "device_id": "printer-7"}
    st, env = api.call("POST", "/api/v1.0/download", req)
    check(st == 200 and env["msg"] == "success", "download starts: 200 success")
    st, env = api.call("POST", "/api/v1.0/download", req)
    check(st == 200, "the same download again: 200 (resume, idempotent)")
    d = api.wait({"toInstall", "failed"})
    check(d["stage"] == "toInstall" and d["progress"] == 100, "download verified: toInstall at 100")
    st, env = api.call("POST", "/api/v1.0/update", {"version": "9.9.9"})
    check(st == 400 and env["msg"].startswith("VERSION_MISMATCH"), "update of another version: 400 VERSION_MISMATCH")
    st, env = api.call("POST", "/api/v1.0/update", {"version": "2.0.0"})
    check(st == 200, "update starts: 200")
    d = api.wait({"success", "failed"})
    check(d["stage"] == "success" and d["error"] is None, "update succeeds")
    check(os.readlink(os.path.join(versions, "current")) == "v2.0.0", "current points at v2.0.0")
    with open(os.path.join(versions, "current", "bin", "device-api"), "rb") as f:
        check(f.read() == b"#!/bin/sh\necho device-api 2.0.0\n", "current runs the package's device-api")

    # Every stage change reached the slow receiver, in order, each as the old envelope. Under
    # load an attempt may outlast the 500 ms bound (it is retried; the receiver records every
    # attempt) or the worker's 2 s exit flush may run out: the stages are read once the worker
    # has exited and the next writer has sent what it missed.
    next_writer()
    until = time.time() + 10
    while (not callbacks or callbacks[-1]["data"]["stage"] != "success") and time.time() < until:
        time.sleep(0.1)
    stages = []
    for b in callbacks:
        check(b["code"] == 200 and b["msg"] == "success", f"callback {b['data']['stage']}: code 200")
        s = b["data"]["stage"]
        if not stages or stages[-1] != s:
            stages.append(s)
    check(stages == ["downloading", "verifying", "toInstall", "installing", "success"],
          f"callback stages in order: {stages}")
    progress = [b["data"]["progress"] for b in callbacks if b["data"]["stage"] == "downloading"]
    check(progress == sorted(progress), "download progress never goes back")

    # The version that runs, posted again: success with nothing to do.
    st, env = api.call("POST", "/api/v1.0/download", req)
    api.wait({"toInstall"})
    st, env = api.call("POST", "/api/v1.0/update", {"version": "2.0.0"})
    check(st == 200, "update to the running version: 200")
    d = api.wait({"success", "failed"})
    check(d["stage"] == "success", "the running version: success, nothing to do")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"not ok - {e}")
        sys.exit(1)
