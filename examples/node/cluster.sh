#!/usr/bin/env bash
# Start a 5-peer cluster on this machine (127.0.0.1), each peer its own process.
# Peer 0 listens on a fixed port; the others bootstrap from it and find each other by
# peer exchange. Logs and state go to ./cluster/. Stop with Ctrl-C (peers checkpoint).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-cluster}"
base_port="${BASE_PORT:-4601}"
mkdir -p "$out"
# peer 0's identity decides the bootstrap address: create it first
python -c "from p2pfl.identity import Identity; Identity.load_or_create('$out/key0')"
id0="$(python -c "from p2pfl.identity import Identity; print(Identity.load_or_create('$out/key0').peer_id)")"
boot="/ip4/127.0.0.1/tcp/${base_port}/p2p/${id0}"
pids=()
for i in 0 1 2 3 4; do
  args=(node --config "$here/node.toml" --peer-index "$i" --key-file "$out/key$i"
        --state-dir "$out/peer$i" --listen "/ip4/127.0.0.1/tcp/$((base_port + i))")
  [ "$i" -gt 0 ] && args+=(--bootstrap "$boot")
  p2pfl "${args[@]}" > "$out/peer$i.log" 2>&1 &
  pids+=($!)
  echo "peer $i: pid ${pids[-1]}, log $out/peer$i.log, status $out/peer$i/status.json"
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM
wait
for i in 0 1 2 3 4; do
  python -c "import json; s=json.load(open('$out/peer$i/status.json')); print('peer $i', 'round', s['rounds_done'], 'accuracy', s['accuracy'])"
done
