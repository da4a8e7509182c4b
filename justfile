# amiflow's command runner. Every recipe is a plain command from README.md: nothing here is
# reachable only through `just`.

_default:
    @just --list

# The README's first command: the whole rollout in a local AWS world.
demo:
    cargo run -p amictl -- demo

# The README's second command: every test (unit, mocked AWS, end to end against the emulator).
test:
    cargo test --workspace

# What CI runs.
ci:
    bash .ci/run

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Regenerate schemas/ from the event types.
schemas:
    cargo run -p events --example gen-schemas

# Runtime throughput against a raw SDK loop; writes BENCHMARKS.md.
bench-runtime:
    cargo build --release -p e2e --bins
    cargo run --release -p e2e --bin bench-runtime

# A whole rollout at the seed story's size (about 4,500 instances); writes BENCHMARKS.md.
bench-rollout:
    cargo build -p rollout -p amictl --bins
    cargo run -p e2e --bin bench-rollout -- --scale seed

# How close a worker runs to AWS's request rates, and how often it is throttled; writes BENCHMARKS.md.
bench-throttle:
    cargo run -p bench --bin bench-throttle

# Every benchmark, one after the other; each rewrites its own section of BENCHMARKS.md.
bench: bench-runtime bench-throttle bench-rollout

# Lambda zips of every worker for provided.al2023 (see deploy/README.md).
package:
    bash deploy/package
