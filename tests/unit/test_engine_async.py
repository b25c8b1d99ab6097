"""The async Engine: requests join at any time, stream deltas, abort frees KV blocks, a bad
request fails alone and the engine keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cluster import LLM, Engine, EngineConfig, EngineDeadError, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(moe_checkpoint: Path):
    eng = Engine(moe_checkpoint, dtype="float32",
                 engine=EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16))
    yield eng
    eng.shutdown()
    assert not eng._thread.is_alive()


async def _wait_idle(engine: Engine) -> None:
    """The engine thread handles an abort on its next turn: wait (bounded) until it has."""
    for _ in range(100):
        if not engine.core.has_work():
            return
        await asyncio.sleep(0.05)


async def _collect(engine: Engine, prompt, params=GREEDY, delay: float = 0.0):
    await asyncio.sleep(delay)
    outs = [o async for o in engine.generate(prompt, params)]
    return outs


def test_streams_match_offline(engine: Engine, moe_checkpoint: Path) -> None:
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 9]

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(_collect(engine, p, delay=0.02 * i) for i, p in enumerate(prompts))), 120
        )

    streams = asyncio.run(main())
    offline = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=64).generate(prompts, GREEDY)
    for outs, ref in zip(streams, offline):
        assert len(outs) == GREEDY.max_tokens
        assert [t for o in outs for t in o.delta_token_ids] == ref.token_ids
        assert "".join(o.delta_text for o in outs) == ref.text == outs[-1].text
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_abort_on_early_exit_frees_blocks(engine: Engine) -> None:
    async def main():
        gen = engine.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=500, ignore_eos=True))
        async for out in gen:
            if out.num_output_tokens >= 3:
                break
        await gen.aclose()
        await _wait_idle(engine)

    asyncio.run(main())
    assert not engine.core.has_work()
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_cancelled_task_aborts(engine: Engine) -> None:
    started = asyncio.Event()

    async def slow_consumer():
        async for _ in engine.generate([9, 8, 7], SamplingParams(max_tokens=10_000, ignore_eos=True)):
            started.set()
            await asyncio.sleep(0.01)  # a slow client: the cancel lands while it waits
        raise AssertionError("the stream should have been cancelled before it finished")

    async def main():
        task = asyncio.create_task(slow_consumer())
        await asyncio.wait_for(started.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_idle(engine)

    asyncio.run(main())
    assert not engine.core.has_work()
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_bad_request_fails_alone(engine: Engine) -> None:
    async def main():
        with pytest.raises(ValueError, match="token id"):
            await _collect(engine, [1, 10**6])
        return await asyncio.wait_for(_collect(engine, [1, 2]), 60)

    outs = asyncio.run(main())
    assert outs[-1].finished and engine.healthy


def test_engine_failure_reaches_streams(moe_checkpoint: Path) -> None:
    eng = Engine(moe_checkpoint, dtype="float32", engine=EngineConfig(num_kv_blocks=32))

    def broken(batch):
        raise RuntimeError("simulated device fault")

    eng.core.runner.execute = broken  # type: ignore[method-assign]

    async def main():
        with pytest.raises(Exception, match="simulated device fault"):
            await asyncio.wait_for(_collect(eng, [1, 2, 3]), 30)

    asyncio.run(main())
    assert not eng.healthy
    with pytest.raises(Exception, match="not running"):
        asyncio.run(_collect(eng, [1]))
    eng.shutdown()


def test_shutdown_ends_open_streams_at_once(moe_checkpoint: Path) -> None:
    """A replica stopped past its drain period shuts its engine down: a stream still open ends
    with EngineDeadError then, not after request_timeout_s (here far beyond the test's wait)."""
    eng = Engine(moe_checkpoint, dtype="float32", engine=EngineConfig(num_kv_blocks=64, block_size=4),
                 request_timeout_s=3600)

    async def main() -> BaseException | None:
        first = asyncio.Event()

        async def stream() -> None:
            async for _ in eng.generate([1, 2, 3], SamplingParams(max_tokens=100000, ignore_eos=True)):
                first.set()
                await asyncio.sleep(0.01)

        task = asyncio.create_task(stream())
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.to_thread(eng.shutdown)
        done, _ = await asyncio.wait([task], timeout=30)
        assert done, "the stream was still waiting after shutdown"
        return task.exception()

    err = asyncio.run(main())
    assert isinstance(err, EngineDeadError) and "shut down" in str(err), err
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(eng, [1]))


def test_stream_outputs_carry_deltas_and_counts_only(engine: Engine) -> None:
    """Only the final output of a stream holds the cumulative lists; every other one has this
    step's delta and the running counts, so a long answer costs the same per token."""
    async def main():
        return await asyncio.wait_for(_collect(engine, [4, 5, 6], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True)), 60)

    outs = asyncio.run(main())
    assert all(o.token_ids is None and o.text is None and o.logprobs is None for o in outs[:-1])
    assert [o.num_output_tokens for o in outs] == [1, 2, 3, 4, 5, 6]
    assert all(o.num_prompt_tokens == 3 and len(o.delta_logprobs) == 1 for o in outs)
    assert outs[-1].token_ids == [t for o in outs for t in o.delta_token_ids]
    assert outs[-1].logprobs == [lp for o in outs for lp in o.delta_logprobs]


def test_coalesced_stream_merges_steps_into_fewer_outputs(engine: Engine) -> None:
    """A consumer slower than the engine gets what several steps made as one output, the same
    tokens, text and logprobs in all; without `coalesce` every step is its own output."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)

    async def slow(coalesce: bool):
        outs = []
        async for o in engine.generate([3, 1, 4, 1, 5], params, coalesce=coalesce):
            outs.append(o)
            await asyncio.sleep(0.05)  # the engine runs several steps meanwhile
        return outs

    merged = asyncio.run(asyncio.wait_for(slow(True), 60))
    plain = asyncio.run(asyncio.wait_for(slow(False), 60))
    assert len(plain) == 24 and len(merged) < 24
    assert [t for o in merged for t in o.delta_token_ids] == [t for o in plain for t in o.delta_token_ids] == plain[-1].token_ids
    assert "".join(o.delta_text for o in merged) == plain[-1].text == merged[-1].text
    assert [lp for o in merged for lp in o.delta_logprobs] == merged[-1].logprobs
    assert merged[-1].finished and merged[-1].num_output_tokens == 24


def test_stream_interval_holds_tokens_after_the_first(engine: Engine) -> None:
    """stream_interval N: the first token goes out alone (TTFT), every later output holds at least
    N tokens except the last, and the tokens, text and logprobs are those of a plain stream."""
    params = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, logprobs=True)

    async def run(interval: int):
        return [o async for o in engine.generate([3, 1, 4, 1, 5], params, stream_interval=interval)]

    held = asyncio.run(asyncio.wait_for(run(5), 60))
    plain = asyncio.run(asyncio.wait_for(run(1), 60))
    sizes = [len(o.delta_token_ids) for o in held]
    assert sizes[0] == 1 and all(n >= 5 for n in sizes[1:-1]) and sum(sizes) == 23
    assert len(held) <= 1 + 22 // 5 + 1 < len(plain) == 23
    assert [t for o in held for t in o.delta_token_ids] == plain[-1].token_ids == held[-1].token_ids
    assert "".join(o.delta_text for o in held) == plain[-1].text
    assert [lp for o in held for lp in o.delta_logprobs] == held[-1].logprobs
    assert held[-1].finished and held[-1].num_output_tokens == 23


def test_stream_interval_holds_only_while_enough_requests_stream(engine: Engine) -> None:
    """stream_interval_min_streams 2: a request alone streams every token; two at once hold theirs
    to chunks of the interval (if one was admitted a step later, its last tokens after the other
    finished go out as they come: one streaming alone again)."""
    params = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True)

    async def one(prompt: list[int]):
        return [o async for o in engine.generate(prompt, params, stream_interval=5, stream_interval_min_streams=2)]

    async def two():
        return await asyncio.gather(one([3, 1, 4, 1, 5]), one([2, 7, 1, 8]))

    alone = asyncio.run(asyncio.wait_for(one([3, 1, 4, 1, 5]), 60))
    assert [len(o.delta_token_ids) for o in alone] == [1] * 23
    for outs in asyncio.run(asyncio.wait_for(two(), 60)):
        sizes = [len(o.delta_token_ids) for o in outs]
        assert sizes[0] == 1 and sum(sizes) == 23 and max(sizes) >= 5 and len(outs) <= 8
    assert [t for o in alone for t in o.delta_token_ids] == alone[-1].token_ids


def test_stream_max_delay_sends_a_held_chunk_early(engine: Engine) -> None:
    """stream_max_delay_ms bounds a chunk in time: with an interval larger than the whole output, no
    bound gives the first token and then everything at the end; a bound of 0 sends each held output
    at the next chance, so the stream keeps moving. The tokens and text are the same either way."""
    params = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True)

    async def run(delay_ms: float | None):
        return [o async for o in engine.generate([3, 1, 4, 1, 5], params, stream_interval=1000,
                                                 stream_max_delay_ms=delay_ms)]

    unbounded = asyncio.run(asyncio.wait_for(run(None), 60))
    bounded = asyncio.run(asyncio.wait_for(run(0), 60))
    assert [len(o.delta_token_ids) for o in unbounded] == [1, 22]
    assert len(bounded) > 2 and sum(len(o.delta_token_ids) for o in bounded) == 23
    assert [t for o in bounded for t in o.delta_token_ids] == unbounded[-1].token_ids == bounded[-1].token_ids
    assert "".join(o.delta_text for o in bounded) == unbounded[-1].text
    assert bounded[-1].finished and not any(o.finished for o in bounded[:-1])
    with pytest.raises(RequestError, match="stream_max_delay_ms"):
        asyncio.run(asyncio.wait_for(run(-1), 60))


def test_stream_interval_below_one_is_refused(engine: Engine) -> None:
    async def run():
        return [o async for o in engine.generate([1, 2], GREEDY, stream_interval=0)]

    with pytest.raises(RequestError, match="stream_interval"):
        asyncio.run(asyncio.wait_for(run(), 60))
