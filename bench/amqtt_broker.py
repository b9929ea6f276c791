"""Bare amqtt 0.12.1, the "plain amqtt" baseline: `python -m bench.amqtt_broker --port P`.

A TCP listener and anonymous auth, nothing else: giving `plugins` replaces
amqtt's defaults, so the $SYS plugin and the event/packet loggers are off. It
runs on the default asyncio loop, as amqtt's own `amqtt` command does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from amqtt.broker import Broker


async def serve(port: int) -> None:
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.wait_for(broker.shutdown(), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
