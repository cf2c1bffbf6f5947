# The two commands of the README, and a few helpers.
#   make run    start everything locally and show keys being handed out
#   make test   the whole test suite against real Kafka + MongoDB-wire servers
#   make bench  producer, init and end-to-end throughput, appended to BENCHMARKS.md
.PHONY: run test bench lint servers-up servers-down servers-status check-compose load-test

run:
	scripts/run.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

servers-up:
	scripts/servers.sh up

servers-down:
	scripts/servers.sh down

servers-status:
	scripts/servers.sh status

check-compose:
	python3 scripts/check-compose.py

load-test:
	scripts/load-test.sh
