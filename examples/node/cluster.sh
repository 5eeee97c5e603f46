#!/usr/bin/env bash
# Start a 5-peer cluster on this machine (127.0.0.1), each peer its own process.
# Peer 0 listens on a fixed port; the others bootstrap from it and find each other by
# peer exchange. Logs and state go to ./cluster/ (or the directory given as $1).
# Stop with Ctrl-C: the peers checkpoint, and a second run resumes where they stopped.
#
#   examples/node/cluster.sh                       # every peer a neighbour of every other
#   TOPOLOGY=ring examples/node/cluster.sh         # neighbours from a ring file of peer ids
#   ATTACKER_CONFIG=examples/node/attacker.toml examples/node/cluster.sh   # the last peer attacks
#   CONFIG=my.toml BASE_PORT=5000 examples/node/cluster.sh run2
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-cluster}"
config="${CONFIG:-$here/node.toml}"
base_port="${BASE_PORT:-4601}"
size=5
mkdir -p "$out"
# the identities decide the bootstrap address (and the topology file): create them first
mapfile -t ids < <(python - "$out" "$size" <<'EOF'
import sys
from p2pfl.identity import Identity
for i in range(int(sys.argv[2])):
    print(Identity.load_or_create(f"{sys.argv[1]}/key{i}").peer_id)
EOF
)
boot="/ip4/127.0.0.1/tcp/${base_port}/p2p/${ids[0]}"
extra=()
if [ "${TOPOLOGY:-}" = ring ]; then
  for i in $(seq 0 $((size - 1))); do echo "${ids[$i]} ${ids[$(((i + 1) % size))]}"; done > "$out/ring.txt"
  extra+=(--set "network.topology_file=\"$out/ring.txt\"")
  echo "topology: $out/ring.txt"
fi
pids=()
for i in $(seq 0 $((size - 1))); do
  peer_config="$config"
  if [ -n "${ATTACKER_CONFIG:-}" ] && [ "$i" -eq $((size - 1)) ]; then
    peer_config="$ATTACKER_CONFIG"
    echo "peer $i runs $ATTACKER_CONFIG (an attacker)"
  fi
  args=(node --config "$peer_config" --peer-index "$i" --num-peers "$size" --key-file "$out/key$i"
        --state-dir "$out/peer$i" --listen "/ip4/127.0.0.1/tcp/$((base_port + i))" "${extra[@]}")
  [ "$i" -gt 0 ] && args+=(--bootstrap "$boot")
  p2pfl "${args[@]}" > "$out/peer$i.log" 2>&1 &
  pids+=($!)
  echo "peer $i: pid ${pids[-1]}, log $out/peer$i.log, status $out/peer$i/status.json"
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM
wait || true  # interrupted by the trap: the peers have stopped, show where they got
for i in $(seq 0 $((size - 1))); do
  python -c "import json; s=json.load(open('$out/peer$i/status.json')); print('peer $i', 'round', s['rounds_done'], 'accuracy', s['accuracy'], 'neighbours', len(s['neighbours']), 'ATTACKER ' + s['attack']['name'] if s.get('attack') else '')"
done
