#!/usr/bin/env bash
# The container check (`make check-containers`, not part of `make test`): build both images from the Dockerfiles
# as committed, run the compose demo to the end (certs, server, three clients over mutual TLS), copy the exported
# adapter out, load it with peft and compare its held-out loss with the base model's. Uses podman (Debian's
# package, as root) and podman-compose (PyPI); makes its own Debian 12 base image with debootstrap, since no
# registry may serve python:3.11-slim or nvidia/cuda here; installs torch from the wheel pip's own configuration
# on this host finds (a local, CPU-only wheel). Everything it makes is removed at the end, also when interrupted.
#
# Environment: SPLITLORA_ROUNDS / SPLITLORA_LOCAL_STEPS (the demo's schedule, default the file's 5 x 30),
# SPLITLORA_SERVER_THREADS / SPLITLORA_CLIENT_THREADS (OMP threads per container: 1 here, the file's defaults are
# 4 and 2: on 2 cores that many threads slow the demo down threefold),
# SPLITLORA_CHECK_WORK (scratch directory), SPLITLORA_CHECK_KEEP=1 (keep images and containers for a look),
# SPLITLORA_CHECK_HOLD=SECONDS (keep the demo's server, with its metrics port, up that long after training:
# time for a dashboard screenshot).
# Exit status: 0 all passed; 1 the project failed a stage; 3 the engine cannot run here (the reason is printed).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${SPLITLORA_CHECK_WORK:-$(mktemp -d /var/tmp/splitlora-check.XXXXXX)}
PROJECT=splitlora-check
BASE_IMAGE=localhost/splitlora-check/debian-python:12
CLIENT_IMAGE=splitlora/client:0.1.0
SERVER_IMAGE=splitlora/server:0.1.0
COMPOSE_VERSION=1.6.0
INDEX_PORT=${SPLITLORA_CHECK_INDEX_PORT:-18731}
export SPLITLORA_SERVER_THREADS=${SPLITLORA_SERVER_THREADS:-1} SPLITLORA_CLIENT_THREADS=${SPLITLORA_CLIENT_THREADS:-1}
START=$(date +%s)
PIDS=()
IMAGES_BEFORE=""

say() { printf '%s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
unavailable() { say "ENGINE UNAVAILABLE: $*" >&2; exit 3; }
STAGE_NAME="" STAGE_START=0
stage() {  # stage LABEL WHAT
    stage_done
    STAGE_NAME=$1 STAGE_START=$(date +%s)
    say "==> $(date -u +%H:%M:%S) $1: $2"
}
stage_done() {
    if [[ -n $STAGE_NAME ]]; then say "    [$STAGE_NAME: $(( $(date +%s) - STAGE_START )) s]"; fi
    STAGE_NAME=""
}
compose() { "$WORK/tools/bin/podman-compose" -p "$PROJECT" -f "$ROOT/docker/docker-compose.yml" "$@"; }
container() { say "${PROJECT}_$1_1"; }
human() { numfmt --to=si --suffix=B --format=%.2f "$1"; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stage_done
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ ${SPLITLORA_CHECK_KEEP:-0} == 1 ]]; then
        say "==> kept (SPLITLORA_CHECK_KEEP=1): project $PROJECT, images $CLIENT_IMAGE $SERVER_IMAGE $BASE_IMAGE"
    elif command -v podman >/dev/null; then
        say "==> cleaning up: containers, networks and volumes of $PROJECT, the images this run made, $WORK"
        # (podman reports, as errors, that it has no systemd timers to remove: ignored)
        podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f -t 5 >/dev/null 2>&1 || true
        podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
        podman network ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null 2>&1 || true
        podman rmi -f "$CLIENT_IMAGE" "$SERVER_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
        if [[ -n $IMAGES_BEFORE ]]; then  # intermediate build stages: every image id that was not there before
            comm -13 <(sort -u <<<"$IMAGES_BEFORE") <(podman images -aq --no-trunc | sort -u) | xargs -r podman rmi -f >/dev/null 2>&1 || true
        fi
        rm -rf "$WORK"
    fi
    say "==> total: $(( $(date +%s) - START )) s, exit status $status"
    exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

install_engine() {
    stage engine "podman, runc, debootstrap from Debian's packages; podman-compose $COMPOSE_VERSION from PyPI"
    [[ $EUID -eq 0 ]] || unavailable "needs root (rootful podman; rootless podman needs subordinate uid ranges this check does not set up)"
    local missing=()
    for cmd in podman runc debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    if ((${#missing[@]})); then
        apt-get update -q >/dev/null || unavailable "apt-get update failed: Debian's package archive is not reachable"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" uidmap slirp4netns fuse-overlayfs netavark aardvark-dns ca-certificates >/dev/null \
            || unavailable "cannot install ${missing[*]} from Debian's packages"
    fi
    # runc (crun's seccomp and cgroup handling fails in some VMs), cgroupfs (no systemd as PID 1 here),
    # no default ulimits (a container may not raise nofile above what this sandbox allows)
    if [[ ! -e /etc/containers/containers.conf ]]; then
        mkdir -p /etc/containers
        printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
            > /etc/containers/containers.conf
        say "    wrote /etc/containers/containers.conf (runtime runc, cgroupfs, no default ulimits)"
    fi
    podman info >/dev/null 2>"$WORK/podman-info.err" || unavailable "podman info failed: $(tail -3 "$WORK/podman-info.err")"
    python3 -m venv "$WORK/tools" && "$WORK/tools/bin/pip" install -q "podman-compose==$COMPOSE_VERSION" 2>"$WORK/pip.err" \
        || unavailable "cannot install podman-compose $COMPOSE_VERSION from PyPI: $(tail -2 "$WORK/pip.err")"
    say "    $(podman --version), runc $(runc --version | head -1 | awk '{print $3}'), podman-compose $COMPOSE_VERSION"
    IMAGES_BEFORE=$(podman images -aq --no-trunc)
}

make_base() {
    stage base "Debian 12 (Python 3.11) with debootstrap, imported as $BASE_IMAGE"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || unavailable "debootstrap failed (Debian's archive unreachable?): $(tail -2 "$WORK/debootstrap.log")"
    # this host's CA bundle: pip inside the builds reaches the package registry through it
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$WORK/rootfs/etc/pip.conf"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    podman run --rm --network none "$BASE_IMAGE" true 2>"$WORK/run.err" \
        || unavailable "podman cannot start a container here: $(tail -3 "$WORK/run.err")"
    say "    $BASE_IMAGE: $(human "$(podman image inspect -f '{{.Size}}' "$BASE_IMAGE")")"
}

torch_index() {
    stage torch "a PEP 503 index on 127.0.0.1:$INDEX_PORT with the CPU wheel pip's configuration here finds"
    mkdir -p "$WORK/index/files"
    python3 -m pip download -q --only-binary :all: --dest "$WORK/index/files" "torch==$(torch_version)" 2>"$WORK/pip.err" \
        || fail "pip download torch: $(tail -3 "$WORK/pip.err")"
    python3 - "$WORK/index" <<'EOF'
import html, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
projects: dict[str, list[str]] = {}
for wheel in sorted((root / "files").glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower(), []).append(wheel.name)
for name, wheels in projects.items():
    (root / "simple" / name).mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../files/{html.escape(w)}">{html.escape(w)}</a>\n' for w in wheels)
    (root / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
EOF
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" >"$WORK/index.log" 2>&1 &
    PIDS+=($!)
    sleep 1
    say "    $(ls "$WORK/index/files" | grep -c whl) wheels: $(ls "$WORK/index/files" | grep '^torch-')"
}
torch_version() { sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/docker/client.Dockerfile"; }

build() {  # build NAME DOCKERFILE IMAGE BASE_ARG
    stage "build $1" "podman build -f docker/$2 --build-arg $4=$BASE_IMAGE --build-arg TORCH_INDEX=(the local index)"
    podman build --format docker --network host --layers=false -f "$ROOT/docker/$2" -t "$3" \
        --build-arg "$4=$BASE_IMAGE" --build-arg "TORCH_INDEX=http://127.0.0.1:$INDEX_PORT/simple" \
        "$ROOT" >"$WORK/build-$1.log" 2>&1 || { tail -30 "$WORK/build-$1.log"; fail "building the $1 image"; }
    say "    $3: $(human "$(podman image inspect -f '{{.Size}}' "$3")")"
}

sizes() {
    stage sizes "what makes up each image"
    local site=/opt/splitlora/lib/python3.11/site-packages
    for image in "$CLIENT_IMAGE" "$SERVER_IMAGE"; do
        say "    $image: $(human "$(podman image inspect -f '{{.Size}}' "$image")") uncompressed; in MB:"
        podman run --rm --network none --entrypoint sh "$image" -c "du -sm /usr /var /opt/splitlora; cd $site && \
            du -sm * | sort -rn | head -8; du -sm torch/lib | sed 's|^|(of torch) |'" 2>/dev/null | tr '\t' ' ' \
            | paste -sd';' | sed 's/;/; /g; s/^/      /'
    done
}

health_ticker() {  # podman runs health checks from systemd timers; without systemd as PID 1, this loop does
    while sleep 5; do
        for name in server alice bob carol; do
            if [[ $(podman inspect -f '{{.State.Running}}' "$(container "$name")" 2>/dev/null) == true ]]; then
                if podman healthcheck run "$(container "$name")" >/dev/null 2>&1; then
                    echo "$name healthy"; else echo "$name unhealthy"; fi
            fi
        done
    done
}

wait_healthy() {  # wait_healthy SERVICE SECONDS
    local deadline=$(( $(date +%s) + $2 ))
    until podman healthcheck run "$(container "$1")" >/dev/null 2>&1; do
        [[ $(podman inspect -f '{{.State.Running}}' "$(container "$1")") == true ]] \
            || { logs_of "$1"; fail "$1 exited before it became healthy"; }
        (( $(date +%s) < deadline )) || { logs_of "$1"; fail "$1 not healthy after $2 s"; }
        sleep 2
    done
}

logs_of() { podman logs "$(container "$1")" 2>&1 | tail -30; }

health_summary() {  # a client is unhealthy until its first step: a start period, as docker counts it
    local name
    for name in server alice bob carol; do
        printf '%s %s/%s; ' "$name" "$(grep -c "^$name healthy" "$WORK/health.log")" "$(grep -c "^$name " "$WORK/health.log")"
    done
}

run_demo() {
    stage demo "certs, then server (healthy), then alice, bob, carol: ${SPLITLORA_ROUNDS:-5} rounds x ${SPLITLORA_LOCAL_STEPS:-30} steps"
    say "    OMP threads: server $SPLITLORA_SERVER_THREADS, each client $SPLITLORA_CLIENT_THREADS"
    # podman 4.3 has no `wait --condition=healthy`, so podman-compose 1.6 skips service_healthy there, and its
    # wait for service_completed_successfully can return before certs exits: the depends_on order of
    # docker-compose.yml is followed here one `up` at a time, with the file's own health check
    compose up -d --no-build certs >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; fail "compose up certs"; }
    local code
    code=$(timeout 600 podman wait "$(container certs)") || fail "certs still running after 10 min"
    [[ $code == 0 ]] || { logs_of certs; fail "certs exited $code"; }
    say "    certs exited 0: $(podman logs "$(container certs)" 2>&1 | grep -c '^/certs/') files in the certs volume"
    compose up -d --no-build --no-deps server >>"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; fail "compose up server"; }
    wait_healthy server 600
    say "    server healthy after $(( $(date +%s) - STAGE_START )) s"
    health_ticker >"$WORK/health.log" 2>&1 &
    PIDS+=($!)
    compose up -d --no-build --no-deps alice bob carol >>"$WORK/compose-up.log" 2>&1 \
        || { cat "$WORK/compose-up.log"; fail "compose up alice bob carol"; }
    for name in alice bob carol; do
        code=$(timeout 3600 podman wait "$(container "$name")") || fail "$name still running after an hour"
        [[ $code == 0 ]] || { logs_of "$name"; fail "$name exited $code"; }
        say "    $name exited 0: $(podman logs "$(container "$name")" 2>&1 | grep -c '"message"') log records, the last: $(
            podman logs "$(container "$name")" 2>&1 | sed -n 's/.*"message": "\([^"]*\)".*/\1/p' | tail -1)"
    done
    if [[ -n ${SPLITLORA_CHECK_HOLD:-} ]]; then say "    holding $SPLITLORA_CHECK_HOLD s for a look"; sleep "$SPLITLORA_CHECK_HOLD"; fi
    code=$(timeout 600 podman wait "$(container server)") || fail "server still running 10 min after the clients"
    [[ $code == 0 ]] || { logs_of server; fail "server exited $code"; }
    say "    server exited 0; health checks (passed/run): $(health_summary)"
    podman logs "$(container server)" 2>&1 | sed -n 's/.*"message": "\([^"]*\)".*/    server: \1/p' \
        | grep -E 'closed on the server|exported' | tail -2
}

evaluate() {
    stage adapter "podman cp out of the results volume, PeftModel.from_pretrained, held-out loss"
    podman cp "$(container server):/out/server/adapter" "$WORK/adapter"
    mkdir -p "$WORK/model"
    podman cp "$(container server):/model/." "$WORK/model"
    ls "$WORK/adapter" | sed 's/^/    adapter: /'
    local model
    model=$(dirname "$(find "$WORK/model" -name config.json | head -1)")
    [[ -x $ROOT/.venv/bin/python ]] || make -C "$ROOT" venv >/dev/null
    "$ROOT/.venv/bin/python" "$ROOT/scripts/eval_adapter.py" --model "$model" --adapter "$WORK/adapter" \
        --train "$ROOT"/docker/data/*.txt 2>"$WORK/eval.err" | sed 's/^/    /' \
        || { tail -5 "$WORK/eval.err"; fail "the exported adapter does not lower the held-out loss"; }
}

mkdir -p "$WORK"
install_engine
make_base
torch_index
build client client.Dockerfile "$CLIENT_IMAGE" PYTHON_IMAGE
build server server.Dockerfile "$SERVER_IMAGE" CUDA_IMAGE
sizes
run_demo
evaluate
stage_done
say "==> all stages passed"
