#!/usr/bin/env bash
# The main job on the built-in examples. Part 1, the compiler: compile,
# inspect, check, matrix. Part 2, the enforcer (as root): a network
# namespace per pod, trireme-runtime enforcing the compiled policy, and a
# real TCP probe of every pair, printed beside the expected matrix.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# TRIREME_DEMO_PROFILE=dev (the test command) reuses the test build
# instead of compiling everything again with optimizations.
profile="${TRIREME_DEMO_PROFILE:-release}"
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --profile "$profile" --quiet -p trireme-compiler -p trireme-runtime
T=target/$dir/trireme
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
set -x
$T compile -f testdata/apobeer -o "$out/apobeer.out"
$T inspect "$out/apobeer.out"
$T check --ruleset "$out/apobeer.out" -f testdata/apobeer/cluster.yaml --from beer/frontend --to beer/backend --port 80/TCP
$T check --ruleset "$out/apobeer.out" -f testdata/apobeer/cluster.yaml --from beer/external --to beer/backend --port 80/TCP || echo "(exit $?: denied, as the policy intends)"
$T matrix -f testdata/three-tier --port 80/TCP --port 8080/TCP
$T test testdata/tests/apobeer.yaml testdata/tests/three-tier.yaml
# WASM plugins: teams resolved from images, a deny-list decide hook (docs/plugin-abi.md).
bash policies-wasm/build.sh
$T compile -f testdata/plugins/policies.trireme --plugin image-team=target/plugins/image_team.wasm --plugin deny-list=target/plugins/deny_list.wasm --plugin-config deny-list=testdata/plugins/deny-list.yaml -o "$out/shop.out"
$T matrix --ruleset "$out/shop.out" -f testdata/plugins/cluster.yaml --port 8080 --port 8443
$T plugin test target/plugins/image_team_c.wasm policies-wasm/examples/cases/image-team.yaml
$T test testdata/tests/plugins.yaml
sed 's/role: frontend/role: external/' testdata/apobeer/policy.yaml > "$out/changed.yaml"
$T diff testdata/apobeer/policy.yaml "$out/changed.yaml" -f testdata/apobeer/cluster.yaml || echo "(exit $?: flows changed)"
set +x
if [ "$(id -u)" -eq 0 ]; then
  target/$dir/trireme-demo testdata/apobeer testdata/three-tier
else
  echo "(skipping the enforcement demo: it needs root to create network namespaces)"
fi
