#!/usr/bin/env bash
# Local demo on loopback: build tope-ota, serve a sample package on 127.0.0.1, download and
# verify it while a device-api stub prints the progress callbacks, then show the status.
# Needs cargo and python3 (both on a fresh machine); leaves everything under one temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
bin=$PWD/target/release/tope-ota
work=$(mktemp -d "${TMPDIR:-/tmp}/tope-ota-demo.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 100); do
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "demo: nothing listens on port $1" >&2
    return 1
}

echo "== building a sample package in $work/srv"
mkdir -p "$work/srv"
python3 - "$work/srv/tope-1.2.0.zip" <<'PY'
import json, os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("manifest.json", json.dumps({
        "version": "1.2.0",
        "modules": [{"name": "device-api", "src": "bin/device-api", "dst": "bin/device-api",
                     "process_name": "device-api", "restart_order": 1}],
    }, indent=2))
    info = zipfile.ZipInfo("bin/device-api")
    info.external_attr = 0o755 << 16
    z.writestr(info, "#!/bin/sh\necho device-api 1.2.0\n" + "#" * 4_000_000)
    z.writestr("assets/blob.bin", os.urandom(3_000_000))
PY
pkg=$work/srv/tope-1.2.0.zip
size=$(stat -c %s "$pkg")
md5=$(md5sum "$pkg" | cut -d' ' -f1)

pkg_port=$(free_port)
python3 -m http.server "$pkg_port" --bind 127.0.0.1 --directory "$work/srv" >"$work/pkg-server.log" 2>&1 &
pids+=($!)

api_port=$(free_port)
python3 - "$api_port" "$work/callbacks.log" >/dev/null 2>&1 <<'PY' &
import http.server, sys
log = open(sys.argv[2], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        log.write(body.decode() + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)
wait_port "$pkg_port"
wait_port "$api_port"

export TOPE_OTA_STATE_DIR=$work/state
export TOPE_OTA_VERSIONS_DIR=$work/versions
export TOPE_OTA_REPORT_URL=http://127.0.0.1:$api_port/api/v1.0/ota/report

echo "== tope-ota download (package server on 127.0.0.1:$pkg_port)"
"$bin" download --version 1.2.0 --url "http://127.0.0.1:$pkg_port/tope-1.2.0.zip" \
    --name tope-1.2.0.zip --size "$size" --md5 "$md5"

echo "== tope-ota status"
"$bin" status
echo "== tope-ota --json status"
"$bin" --json status

echo "== a second download of the same package is verified from disk, not fetched again"
"$bin" --json download --version 1.2.0 --url "http://127.0.0.1:$pkg_port/tope-1.2.0.zip" \
    --name tope-1.2.0.zip --size "$size" --md5 "$md5"

echo "== a wrong MD5 is refused, and the bad file deleted (exit code 1 expected)"
set +e
"$bin" download --version 1.2.1 --url "http://127.0.0.1:$pkg_port/tope-1.2.0.zip" \
    --name tope-1.2.1.zip --size "$size" --md5 0123456789abcdef0123456789abcdef
echo "exit code: $?"
set -e
"$bin" status

echo "== callbacks received by the device-api stub"
sleep 0.2
cat "$work/callbacks.log"
echo "== demo files are in $work"
