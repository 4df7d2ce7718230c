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

echo "== a fake systemctl that logs what it is asked (no systemd runs here)"
mkdir -p "$work/bin" "$work/services"
cat >"$work/bin/systemctl" <<SH
#!/bin/sh
echo "systemctl \$*" >>"$work/systemctl.log"
case "\$1" in
  stop) rm -f "$work/services/\$2" ;;
  start) touch "$work/services/\$2" ;;
  is-active) test -e "$work/services/\$2" ;;
esac
SH
chmod +x "$work/bin/systemctl"

echo "== packing versions 1.0.0 and 1.1.0 with tope-ota pack"
mkdir -p "$work/srv" "$work/src-1.0.0/bin" "$work/src-1.0.0/share" "$work/src-1.1.0/bin"
printf '#!/bin/sh\necho device-api 1.0.0\n' >"$work/src-1.0.0/bin/device-api"
printf '#!/bin/sh\necho printer-ui 1.0.0\n' >"$work/src-1.0.0/bin/printer-ui"
head -c 3000000 /dev/urandom >"$work/src-1.0.0/share/assets.bin"
chmod +x "$work/src-1.0.0/bin/"*
cat >"$work/src-1.0.0/manifest.json" <<'JSON'
{"version": "1.0.0", "modules": [
  {"name": "device-api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1},
  {"name": "printer-ui", "src": "bin/printer-ui", "dst": "bin/printer-ui", "process_name": "printer-ui", "restart_order": 2},
  {"name": "assets", "src": "share", "dst": "share"}]}
JSON
printf '#!/bin/sh\necho device-api 1.1.0\n' >"$work/src-1.1.0/bin/device-api"
chmod +x "$work/src-1.1.0/bin/device-api"
cat >"$work/src-1.1.0/manifest.json" <<'JSON'
{"version": "1.1.0", "modules": [
  {"name": "device-api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1}]}
JSON
"$bin" pack --version 1.0.0 --out "$work/srv/tope-1.0.0.zip" "$work/src-1.0.0"
"$bin" pack --version 1.1.0 --out "$work/srv/tope-1.1.0.zip" "$work/src-1.1.0"

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
export TOPE_OTA_SYSTEMCTL=$work/bin/systemctl
export TOPE_OTA_GUI=$work/no-ota-gui
export TOPE_OTA_SETTLE_MS=200

fetch() { # version
    local f=$work/srv/tope-$1.zip
    "$bin" download --version "$1" --url "http://127.0.0.1:$pkg_port/tope-$1.zip" \
        --name "tope-$1.zip" --size "$(stat -c %s "$f")" --md5 "$(md5sum "$f" | cut -d' ' -f1)"
}

echo "== tope-ota download 1.0.0 (package server on 127.0.0.1:$pkg_port), then install"
fetch 1.0.0
"$bin" --json status
"$bin" install
echo "== tope-ota download 1.1.0 (only device-api changes), then install"
fetch 1.1.0
"$bin" install
echo "== tope-ota status"
"$bin" status
echo "== unchanged files of 1.1.0 are hard links into 1.0.0:"
ls -li "$work/versions/v1.0.0/share/assets.bin" "$work/versions/v1.1.0/share/assets.bin"

echo "== a wrong MD5 is refused and the bad file deleted (exit code 1 expected)"
set +e
"$bin" download --version 1.2.0 --url "http://127.0.0.1:$pkg_port/tope-1.1.0.zip" \
    --name tope-1.2.0.zip --size "$(stat -c %s "$work/srv/tope-1.1.0.zip")" --md5 0123456789abcdef0123456789abcdef
echo "exit code: $?"
set -e

echo "== tope-ota rollback (back to 1.0.0; previous becomes 1.1.0)"
"$bin" rollback
"$bin" status

echo "== the HTTP API: tope-ota serve, driven with curl as device-api does"
mkdir -p "$work/src-1.2.0/bin"
printf '#!/bin/sh\necho device-api 1.2.0\n' >"$work/src-1.2.0/bin/device-api"
chmod +x "$work/src-1.2.0/bin/device-api"
cat >"$work/src-1.2.0/manifest.json" <<'JSON'
{"version": "1.2.0", "modules": [
  {"name": "device-api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1}]}
JSON
"$bin" pack --version 1.2.0 --out "$work/srv/tope-1.2.0.zip" "$work/src-1.2.0" >/dev/null
api=127.0.0.1:$(free_port)
"$bin" serve --listen "$api" >"$work/serve.log" 2>&1 &
pids+=($!)
wait_port "${api#*:}"
poll() { # stage
    for _ in $(seq 200); do
        out=$(curl -s "http://$api/api/v1.0/progress")
        case "$out" in *"\"stage\":\"$1\""*|*'"stage":"failed"'*) echo "$out"; return 0 ;; esac
        sleep 0.05
    done
    echo "$out"
}
echo "\$ curl -s http://$api/api/v1.0/progress"
curl -s "http://$api/api/v1.0/progress"; echo
f=$work/srv/tope-1.2.0.zip
body="{\"version\":\"1.2.0\",\"package_url\":\"http://127.0.0.1:$pkg_port/tope-1.2.0.zip\",\"package_name\":\"tope-1.2.0.zip\",\"package_size\":$(stat -c %s "$f"),\"package_md5\":\"$(md5sum "$f" | cut -d' ' -f1)\"}"
# curl -d alone sends Content-Type: application/x-www-form-urlencoded, which serve refuses (415).
json='Content-Type: application/json'
echo "\$ curl -s -X POST http://$api/api/v1.0/download -H '$json' -d '$body'"
curl -s -X POST "http://$api/api/v1.0/download" -H "$json" -d "$body"; echo
poll toInstall
echo "\$ curl -s -X POST http://$api/api/v1.0/update -H '$json' -d '{\"version\":\"9.9.9\"}'"
curl -s -X POST "http://$api/api/v1.0/update" -H "$json" -d '{"version":"9.9.9"}'; echo
echo "\$ curl -s -X POST http://$api/api/v1.0/update -H '$json' -d '{\"version\":\"1.2.0\"}'"
curl -s -X POST "http://$api/api/v1.0/update" -H "$json" -d '{"version":"1.2.0"}'; echo
poll success
"$bin" status

echo "== service manager calls"
cat "$work/systemctl.log"
echo "== callbacks received by the device-api stub (last 8)"
sleep 0.2
tail -n 8 "$work/callbacks.log"
echo "== demo files are in $work"
