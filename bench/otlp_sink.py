"""The benchmark's OTLP receiver, in a process of its own as a collector would be.

    python -m bench.otlp_sink

Prints the receiver's URL, serves until its stdin closes, then prints how many spans it received. In the
benchmark's own process the receiver's decoding would hold the load generator's GIL while it times calls,
and every export would show up as latency of the route that exports.
"""

from __future__ import annotations

import sys

from tests.otlp_receiver import OTLPReceiver


def main() -> None:
    with OTLPReceiver().running() as receiver:
        print(receiver.url, flush=True)
        sys.stdin.read()
        print(len(receiver.spans), flush=True)


if __name__ == "__main__":
    main()
