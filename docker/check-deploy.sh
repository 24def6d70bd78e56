#!/usr/bin/env bash
# Checks of the deployment files that need no Docker engine (`make check-deploy`):
#   1. every variable docker-compose.yml reads is documented in .env.example;
#   2. `docker-compose config` resolves the file, with every profile, from .env.example
#      with dummy values for its empty secrets;
#   3. it refuses to resolve, naming the variable, when any one secret is missing;
#   4. hadolint passes both Dockerfiles;
#   5. the API trusts forwarding headers from the TLS proxy's address only.
# docker-compose (Compose v2) and hadolint are binaries from the dev extra (PyPI wheels).
# The environment is emptied for each compose call, so a secret exported in the caller's
# shell can neither hide a failure nor leak into the output.
set -euo pipefail
cd "$(dirname "$0")/.."
compose=$(command -v docker-compose)
hadolint=$(command -v hadolint)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_compose() {  # ENV_FILE ARGS...
    local env_file=$1
    shift
    env -i PATH=/usr/bin:/bin HOME="$work" "$compose" --env-file "$env_file" \
        --project-directory . -f docker-compose.yml "$@"
}

used=$(grep -oP '(?<!\$)\$\{\K[A-Z0-9_]+' docker-compose.yml | sort -u)
documented=$(grep -oP '^#?\s*\K[A-Z0-9_]+(?==)' .env.example | sort -u)
missing=$(comm -23 <(echo "$used") <(echo "$documented"))
if [[ -n "$missing" ]]; then
    echo "check-deploy: not documented in .env.example: $missing" >&2
    exit 1
fi
secrets=$(grep -oP '^[A-Z0-9_]+(?==$)' .env.example)
required=$(grep -oP '\$\{\K[A-Z0-9_]+(?=:\?)' docker-compose.yml | sort -u)
if [[ "$(echo "$secrets" | sort)" != "$required" ]]; then
    echo "check-deploy: .env.example's empty secrets ($secrets) are not the variables" \
        "docker-compose.yml requires ($required)" >&2
    exit 1
fi

dummy="$work/dummy.env"
sed -E 's/^([A-Z0-9_]+)=$/\1=ci-dummy-0123456789abcdef/' .env.example >"$dummy"
run_compose "$dummy" config --quiet
run_compose "$dummy" --profile minio --profile tls --profile demo config --quiet
services=$(run_compose "$dummy" --profile minio --profile tls --profile demo config --services)
echo "check-deploy: compose config resolves: $(echo $services)"

# 5. the API believes X-Forwarded-* from the TLS proxy's address only (never `*`: anyone who
#    reaches the API's port could set the address the audit trail records).
run_compose "$dummy" --profile tls config --format json | python3 -c '
import json, sys
cfg = json.load(sys.stdin)["services"]
allow = [a.split("=", 1)[1] for a in cfg["api"]["command"] if a.startswith("--forwarded-allow-ips=")]
proxy = cfg["caddy"]["networks"]["proxy"]["ipv4_address"]
if allow != [proxy]:
    sys.exit(f"check-deploy: the API trusts forwarding headers from {allow}, not only the proxy {proxy}")
print(f"check-deploy: the API trusts forwarding headers from the proxy {proxy} only")
'

for var in $required; do
    grep -v "^$var=" "$dummy" >"$work/without.env"
    if run_compose "$work/without.env" config --quiet 2>"$work/err"; then
        echo "check-deploy: docker-compose.yml resolves without $var" >&2
        exit 1
    fi
    if ! grep -q "required variable $var is missing a value" "$work/err"; then
        echo "check-deploy: without $var, compose failed for another reason:" >&2
        cat "$work/err" >&2
        exit 1
    fi
    if grep -q "ci-dummy" "$work/err"; then
        echo "check-deploy: compose printed a secret's value" >&2
        exit 1
    fi
done
if run_compose .env.example config --quiet 2>/dev/null; then
    echo "check-deploy: docker-compose.yml resolves with .env.example's empty secrets" >&2
    exit 1
fi
echo "check-deploy: compose refuses to resolve without each of: $(echo $required)"

"$hadolint" docker/Dockerfile.cpu docker/Dockerfile.cuda
echo "check-deploy: hadolint passes docker/Dockerfile.cpu and docker/Dockerfile.cuda"
echo "check-deploy: $("$compose" version), $("$hadolint" --version)"
