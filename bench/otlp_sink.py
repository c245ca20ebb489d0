"""The benchmark's OTLP receiver, in a process of its own as a collector would be.

    python -m bench.otlp_sink

Prints the receiver's URL, serves until its stdin closes, then prints how many spans it received. Out of the
load generator's process, so that the process that times the calls does nothing else (decoding spans there did
not turn out to cause the gateway's p99, but it is work the timing process need not share).
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
