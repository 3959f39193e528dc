"""The access channel protocol without I/O: wire format, decoder, flow control, sessions.

Sessions are tested in pairs (a host and a guest) wired back to back in memory, with a clock
the test moves and predictable nonces.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfabric.access.channel import (
    HEADER,
    MAX_TEXT,
    MAX_WINDOW,
    PREAMBLE,
    ChannelError,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Reason,
    Role,
    Stream,
    StreamError,
    check_empty,
    check_ping,
    data_header,
    decode_hello,
    decode_increment,
    decode_port,
    decode_reason,
    encode_frame,
    encode_open,
    encode_reason,
    encode_window,
    negotiate,
    reason_name,
)
from vmfabric.access.session import (
    ChannelFailed,
    ChannelReset,
    DataReceived,
    Established,
    Event,
    Phase,
    PongReceived,
    Session,
    Settings,
    StateError,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
)

HELLO = Hello(Role.HOST, nonce=7, echo=0, software="host/1")
E = TypeVar("E", bound=Event)


def decode_all(data: bytes, decoder: FrameDecoder | None = None) -> list[Frame]:
    return list((decoder or FrameDecoder()).feed(data))


def sample_frames() -> list[bytes]:
    return [
        HELLO.encode(),
        encode_reason(FrameType.ERROR, 0, Reason.FLOOD, "too much"),
        encode_frame(FrameType.PING, 0, b"12345678"),
        encode_frame(FrameType.PONG, 0, b""),
        encode_open(1, 22),
        encode_frame(FrameType.ACCEPT, 1),
        encode_reason(FrameType.REFUSE, 2, Reason.NOT_ALLOWED, "port 23 is not allowed"),
        data_header(1, 5) + b"hello",
        encode_window(1, 65536),
        encode_frame(FrameType.CLOSE, 1),
        encode_reason(FrameType.RESET, 3, Reason.CANCELLED, ""),
    ]


# --- the wire format ---------------------------------------------------------------------


def test_every_frame_type_round_trips_with_its_payload() -> None:
    frames = decode_all(b"".join(sample_frames()))
    assert [FrameType(f.type) for f in frames] == [
        FrameType.HELLO,
        FrameType.ERROR,
        FrameType.PING,
        FrameType.PONG,
        FrameType.OPEN,
        FrameType.ACCEPT,
        FrameType.REFUSE,
        FrameType.DATA,
        FrameType.WINDOW,
        FrameType.CLOSE,
        FrameType.RESET,
    ]
    hello, error, ping, _, opening, accept, refuse, data, window, close, reset = frames
    assert decode_hello(hello) == HELLO
    assert decode_reason(error) == (Reason.FLOOD, "too much")
    assert ping.payload == b"12345678"
    assert (opening.stream, decode_port(opening)) == (1, 22)
    check_empty(accept)
    assert decode_reason(refuse) == (Reason.NOT_ALLOWED, "port 23 is not allowed")
    assert (data.stream, data.payload) == (1, b"hello")
    assert decode_increment(window) == 65536
    check_empty(close)
    assert (reset.stream, decode_reason(reset)) == (3, (Reason.CANCELLED, ""))


def test_the_header_is_twelve_bytes_in_network_order() -> None:
    assert data_header(0x01020304, 0x0A0B) == bytes.fromhex("0800 0000 01020304 00000a0b")
    assert HEADER.size == 12


def test_hello_ignores_trailing_bytes_left_for_later_versions() -> None:
    frame = Frame(FrameType.HELLO, 0, HELLO.encode()[12:] + b"future fields")
    assert decode_hello(frame) == HELLO


def test_texts_are_cut_without_splitting_a_character() -> None:
    frame = decode_all(encode_reason(FrameType.RESET, 1, Reason.CANCELLED, "é" * 150))[0]
    code, text = decode_reason(frame)
    assert text == "é" * (MAX_TEXT // 2)
    assert reason_name(code) == "CANCELLED" and reason_name(999) == "REASON_999"


def test_the_highest_common_version_is_chosen() -> None:
    assert negotiate((1, 2, 3), (2, 3, 4)) == 3
    assert negotiate((1,), (2,)) is None


@pytest.mark.parametrize("split", range(1, 200))
def test_a_split_anywhere_gives_the_same_frames(split: int) -> None:
    data = b"".join(sample_frames())
    decoder = FrameDecoder()
    assert decode_all(data[:split], decoder) + decode_all(data[split:], decoder) == decode_all(data)


def test_bytes_fed_one_at_a_time_give_the_same_frames() -> None:
    data = b"".join(sample_frames())
    decoder = FrameDecoder()
    frames = [frame for i in range(len(data)) for frame in decoder.feed(data[i : i + 1])]
    assert frames == decode_all(data)


def test_padding_and_the_preamble_are_consumed_silently() -> None:
    data = PREAMBLE + bytes(12) + HELLO.encode() + bytes(24)
    assert decode_all(data) == [Frame(FrameType.HELLO, 0, HELLO.encode()[12:])]


@pytest.mark.parametrize("already", [1, 5, 11, 12, 13, 4000, 65547])
def test_the_preamble_completes_a_partial_frame_and_the_hello_after_it_is_found(
    already: int,
) -> None:
    """A peer restarted in the middle of a frame: what it left, then its preamble and HELLO."""
    partial = (data_header(9, 65535) + bytes(65535))[:already]
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    errors = 0
    stream = decoder.feed(partial + PREAMBLE + HELLO.encode())
    while True:
        try:
            decoded.extend(stream)
            break
        except ChannelError:
            errors += 1
            stream = decoder.feed(b"")
    assert errors <= 1
    assert decoded[-1] == Frame(FrameType.HELLO, 0, HELLO.encode()[12:])
    assert all(frame.type == FrameType.DATA for frame in decoded[:-1])


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (HEADER.pack(12, 0, 0, 1, 0), "unknown frame type 12"),
        (HEADER.pack(FrameType.DATA, 1, 0, 1, 0), "reserved bits"),
        (HEADER.pack(FrameType.DATA, 0, 1, 1, 0), "reserved bits"),
        (HEADER.pack(FrameType.DATA, 0, 0, 0, 0), "without a stream"),
        (HEADER.pack(FrameType.PING, 0, 0, 3, 0), "on stream 3"),
        (HEADER.pack(FrameType.DATA, 0, 0, 1, 65537), "over the 65536-byte limit"),
        (HEADER.pack(FrameType.PAD, 0, 0, 0, 1), "PAD"),
    ],
)
def test_an_impossible_header_is_a_channel_error(header: bytes, problem: str) -> None:
    with pytest.raises(ChannelError, match=problem) as caught:
        decode_all(header + bytes(100))
    assert caught.value.reason is Reason.PROTOCOL_ERROR


def test_frames_before_garbage_come_out_then_only_the_next_hello_and_what_follows() -> None:
    decoder = FrameDecoder()
    frames = decoder.feed(
        encode_open(1, 80)
        + b"\xffgarbage"
        + encode_open(2, 80)
        + HELLO.encode()
        + encode_window(1, 10)
    )
    assert next(frames) == Frame(FrameType.OPEN, 1, struct.pack("!H", 80))
    with pytest.raises(ChannelError):
        next(frames)
    assert decoder.resyncing
    after = decode_all(b"", decoder)
    assert [FrameType(f.type) for f in after] == [FrameType.HELLO, FrameType.WINDOW]


def test_a_resyncing_decoder_finds_a_hello_split_across_feeds() -> None:
    decoder = FrameDecoder(resync=True)
    hello = HELLO.encode()
    assert decode_all(b"noise" * 1000 + hello[:15], decoder) == []
    assert decode_all(hello[15:], decoder) == [Frame(FrameType.HELLO, 0, hello[12:])]


def test_a_magic_without_a_hello_header_in_front_is_skipped() -> None:
    decoder = FrameDecoder(resync=True)
    fake = data_header(1, 20) + HELLO.encode()[12:32]
    assert decode_all(fake + HELLO.encode(), decoder) == [
        Frame(FrameType.HELLO, 0, HELLO.encode()[12:])
    ]


def _hello_payload(**changes: Any) -> bytes:
    return replace(Hello(Role.GUEST, nonce=1, echo=0), **changes).encode()[12:]


@pytest.mark.parametrize(
    "payload",
    [
        b"VMFABRIC",
        b"NOTMAGIC" + _hello_payload()[8:],
        _hello_payload(role=3),
        _hello_payload(nonce=0),
        _hello_payload(versions=()),
        _hello_payload(max_frame=1024),
        _hello_payload(max_frame=1 << 20),
        _hello_payload()[:-8],
    ],
)
def test_a_bad_hello_is_a_channel_error(payload: bytes) -> None:
    with pytest.raises(ChannelError):
        decode_hello(Frame(FrameType.HELLO, 0, payload))


@pytest.mark.parametrize(
    ("frame", "check"),
    [
        (Frame(FrameType.OPEN, 5, b"\x00"), decode_port),
        (Frame(FrameType.OPEN, 5, b"\x00\x00"), decode_port),
        (Frame(FrameType.WINDOW, 5, b"\x00\x00\x00\x00"), decode_increment),
        (Frame(FrameType.WINDOW, 5, b"\x01"), decode_increment),
        (Frame(FrameType.REFUSE, 5, b"\x01"), decode_reason),
        (Frame(FrameType.ACCEPT, 5, b"x"), check_empty),
        (Frame(FrameType.CLOSE, 5, b"x"), check_empty),
    ],
)
def test_a_bad_stream_payload_is_that_streams_error(
    frame: Frame, check: Callable[[Frame], object]
) -> None:
    with pytest.raises(StreamError) as caught:
        check(frame)
    assert caught.value.stream == 5 and caught.value.reason is Reason.PROTOCOL_ERROR


def test_bad_channel_payloads_are_channel_errors() -> None:
    with pytest.raises(ChannelError):
        decode_reason(Frame(FrameType.ERROR, 0, b"\x01"))
    with pytest.raises(ChannelError):
        check_ping(Frame(FrameType.PING, 0, bytes(65)))


# --- one stream's accounts ---------------------------------------------------------------


def test_data_beyond_the_window_or_after_close_is_refused() -> None:
    stream = Stream(1, 80, send_window=0, recv_window=1000, accepted=True)
    stream.received(600)
    with pytest.raises(StreamError) as caught:
        stream.received(401)
    assert caught.value.reason is Reason.FLOW_CONTROL
    stream.received(400)
    stream.remote_closed = True
    with pytest.raises(StreamError) as caught:
        stream.received(0)
    assert caught.value.reason is Reason.STREAM_CLOSED


def test_window_comes_back_in_quarters_and_never_beyond_what_was_received() -> None:
    stream = Stream(1, 80, send_window=0, recv_window=1000, accepted=True)
    stream.received(1000)
    assert stream.consumed(200) == 0
    assert stream.consumed(100) == 300
    assert stream.recv_window == 300
    assert stream.consumed(5000) == 700
    assert stream.recv_window == 1000
    assert stream.consumed(1000) == 0


def test_a_window_grown_past_the_limit_is_a_flow_control_error() -> None:
    stream = Stream(1, 80, send_window=MAX_WINDOW - 10, recv_window=1, accepted=True)
    stream.granted(10)
    with pytest.raises(StreamError) as caught:
        stream.granted(1)
    assert caught.value.reason is Reason.FLOW_CONTROL


def test_payloads_are_cut_to_the_window_and_the_frame_size() -> None:
    stream = Stream(1, 80, send_window=100, recv_window=1, accepted=True)
    stream.outbox += bytes(range(250))
    assert stream.take(64) == bytes(range(64))
    assert stream.take(64) == bytes(range(64, 100))
    assert not stream.sendable
    stream.granted(1000)
    stream.closing = True
    assert stream.take(1000) == bytes(range(100, 250))
    assert stream.sendable and not stream.outbox


# --- sessions ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(role: Role, clock: Clock, nonces: itertools.count[int], **limits: Any) -> Session:
    return Session(role, Settings(**limits), clock=clock, nonces=nonces.__next__)


class Wire:
    """A host and a guest session back to back; events collected per side."""

    def __init__(self, host: dict[str, Any] | None = None, **guest: Any) -> None:
        self.clock = Clock()
        self.host = session(Role.HOST, self.clock, itertools.count(100), **(host or {}))
        self.guest = session(Role.GUEST, self.clock, itertools.count(200), **guest)
        self.host_events: list[Event] = []
        self.guest_events: list[Event] = []

    def start(self) -> Wire:
        self.host.start()
        self.guest.start()
        self.pump()
        return self

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            to_guest = b"".join(self.host.data_to_send(1 << 30))
            to_host = b"".join(self.guest.data_to_send(1 << 30))
            if not to_guest and not to_host:
                return
            self.guest_events += self.guest.receive(to_guest)
            self.host_events += self.host.receive(to_host)

    def open(self, port: int = 80) -> int:
        stream = self.host.open_stream(port)
        self.pump()
        self.guest.accept(stream)
        self.pump()
        return stream

    def received(self, events: list[Event], stream: int) -> bytes:
        return b"".join(
            e.data for e in events if isinstance(e, DataReceived) and e.stream == stream
        )


def of_type(events: list[Event], kind: type[E]) -> list[E]:
    return [event for event in events if isinstance(event, kind)]


def test_the_handshake_establishes_both_sides_once_with_the_peers_limits() -> None:
    wire = Wire(max_streams=3, software="guest/1").start()
    assert wire.host.phase is wire.guest.phase is Phase.ESTABLISHED
    assert wire.host.peer is not None
    assert of_type(wire.host_events, Established) == [Established(1, wire.host.peer)]
    assert len(of_type(wire.guest_events, Established)) == 1
    assert wire.host.peer is not None and wire.host.peer.max_streams == 3
    assert wire.host.peer.software == "guest/1" and wire.host.version == 1


def test_a_guest_that_starts_later_is_answered() -> None:
    wire = Wire()
    wire.host.start()
    wire.pump()
    wire.guest.start()
    wire.pump()
    assert wire.host.phase is wire.guest.phase is Phase.ESTABLISHED


def test_the_highest_common_version_is_used() -> None:
    wire = Wire(host={"versions": (1, 2)}, versions=(1, 2, 3)).start()
    assert wire.host.version == wire.guest.version == 2


def test_no_common_version_fails_with_an_error_frame_saying_so() -> None:
    wire = Wire(host={"versions": (2,)})
    wire.host.start()
    wire.pump()
    wire.guest.start()
    wire.pump()
    assert of_type(wire.host_events, ChannelFailed) == [
        ChannelFailed(
            Reason.VERSION_MISMATCH, "no common protocol version: this side speaks 2, the peer 1"
        )
    ]
    assert of_type(wire.guest_events, ChannelFailed) == [
        ChannelFailed(
            Reason.VERSION_MISMATCH, "no common protocol version: this side speaks 1, the peer 2"
        )
    ]
    assert wire.host.phase is wire.guest.phase is Phase.FAILED


def test_two_hosts_refuse_each_other() -> None:
    clock = Clock()
    one = session(Role.HOST, clock, itertools.count(1))
    other = session(Role.HOST, clock, itertools.count(50))
    one.start()
    other.start()
    events = one.receive(b"".join(other.data_to_send()))
    assert of_type(events, ChannelFailed)[0].code == Reason.ROLE_CONFLICT


def test_a_stream_carries_data_both_ways_and_is_forgotten_after_both_closes() -> None:
    wire = Wire().start()
    stream = wire.open(22)
    assert StreamOpened(stream, 22) in wire.guest_events
    assert StreamAccepted(stream) in wire.host_events
    wire.host.send(stream, b"request")
    wire.host.close(stream)
    wire.guest.send(stream, b"answer")
    wire.pump()
    assert wire.received(wire.guest_events, stream) == b"request"
    assert StreamEnded(stream) in wire.guest_events
    wire.guest.close(stream)
    wire.pump()
    assert wire.received(wire.host_events, stream) == b"answer"
    assert StreamEnded(stream) in wire.host_events
    assert wire.host.stream_count == wire.guest.stream_count == 0


def test_data_sent_before_the_accept_arrives_in_order_and_a_refusal_drops_the_stream() -> None:
    wire = Wire().start()
    first = wire.host.open_stream(80)
    wire.host.send(first, b"early")
    second = wire.host.open_stream(81)
    wire.pump()
    assert wire.received(wire.guest_events, first) == b"early"
    wire.guest.refuse(second, Reason.NOT_ALLOWED, "port 81 is not allowed")
    wire.pump()
    assert StreamRefused(second, Reason.NOT_ALLOWED, "port 81 is not allowed") in wire.host_events
    assert wire.host.stream_count == wire.guest.stream_count == 1


def test_a_sender_never_exceeds_the_window_until_data_is_consumed() -> None:
    wire = Wire(host={"initial_window": 100_000}).start()
    stream = wire.open()
    wire.guest.send(stream, bytes(1_000_000))
    wire.pump()
    assert len(wire.received(wire.host_events, stream)) == 100_000
    assert wire.guest.buffered(stream) == 900_000
    wire.host.consumed(stream, 30_000)
    wire.pump()
    assert len(wire.received(wire.host_events, stream)) == 130_000


def test_data_beyond_the_window_resets_only_that_stream() -> None:
    wire = Wire(initial_window=1000).start()
    flooded, other = wire.open(), wire.open()
    events = wire.guest.receive(data_header(flooded, 1001) + bytes(1001))
    assert events == [
        StreamReset(
            flooded, Reason.FLOW_CONTROL, "1001 bytes of DATA with 1000 bytes of window left", False
        )
    ]
    wire.pump()
    assert of_type(wire.host_events, StreamReset)[0].stream == flooded
    wire.host.send(other, b"fine")
    wire.pump()
    assert wire.received(wire.guest_events, other) == b"fine"
    assert wire.guest.phase is Phase.ESTABLISHED


def test_streams_with_data_take_turns_one_frame_each() -> None:
    wire = Wire().start()
    streams = [wire.open() for _ in range(10)]
    for stream in streams:
        wire.guest.send(stream, bytes(200_000))
    chunks = wire.guest.data_to_send(1 << 30)
    headers = [HEADER.unpack(chunk) for chunk in chunks if len(chunk) == 12]
    order = [stream for _, _, _, stream, _ in headers]
    assert order[:30] == streams * 3
    assert {length for *_, length in headers[:30]} == {65536}


def test_a_peer_that_restarts_resets_every_stream_and_starts_over() -> None:
    wire = Wire().start()
    wire.open()
    first_nonce = wire.host.peer.nonce if wire.host.peer else 0
    wire.guest.start(preamble=True)
    wire.pump()
    reset = of_type(wire.host_events, ChannelReset)
    assert reset and reset[0].code == Reason.PEER_RESTARTED
    assert wire.host.phase is wire.guest.phase is Phase.ESTABLISHED
    assert wire.host.peer is not None and wire.host.peer.nonce != first_nonce
    assert wire.host.stream_count == 0
    assert wire.host.open_stream(80) == 1


def test_a_repeated_announcement_or_a_stale_reply_changes_nothing() -> None:
    wire = Wire().start()
    stream = wire.open()
    announcement = Hello(Role.GUEST, 200, 0).encode()
    stale_reply = Hello(Role.GUEST, 999, echo=12345).encode()
    assert wire.host.receive(announcement + stale_reply) == []
    assert wire.host.buffered(stream) == 0 and wire.host.stream_count == 1


def test_keepalive_pings_a_silent_peer_then_gives_it_up_and_announces_again() -> None:
    wire = Wire(keepalive_interval=1.0, keepalive_timeout=3.0).start()
    wire.clock.now += 1.5
    assert wire.guest.poll() == []
    wire.pump()
    assert of_type(wire.guest_events, PongReceived)
    wire.clock.now += 3.0
    events = wire.guest.poll()
    assert events == [ChannelReset(Reason.KEEPALIVE_TIMEOUT, "nothing heard for 3.0 s", False)]
    assert wire.guest.phase is Phase.WAITING
    sent = decode_all(b"".join(wire.guest.data_to_send()))
    assert [FrameType(f.type) for f in sent] == [FrameType.ERROR, FrameType.HELLO]
    wire.clock.now += 1.0
    wire.guest.poll()
    assert [FrameType(f.type) for f in decode_all(b"".join(wire.guest.data_to_send()))] == [
        FrameType.HELLO
    ]


def test_frames_for_streams_never_opened_are_reset_and_for_finished_ones_ignored() -> None:
    wire = Wire().start()
    stream = wire.open()
    wire.host.reset(stream)
    wire.pump()
    assert wire.guest.receive(encode_window(stream, 10) + data_header(stream, 1) + b"x") == []
    assert wire.host.receive(data_header(stream, 1) + b"x") == []
    assert wire.guest.receive(encode_window(99, 10)) == []
    answer = decode_all(b"".join(wire.guest.data_to_send()))
    assert (answer[0].type, answer[0].stream) == (FrameType.RESET, 99)
    assert decode_reason(answer[0])[0] == Reason.PROTOCOL_ERROR


def test_open_checks_ids_direction_and_the_stream_limit() -> None:
    wire = Wire(max_streams=1).start()
    stream = wire.open()
    events = wire.guest.receive(encode_open(stream, 80))
    assert of_type(events, StreamReset)[0].code == Reason.PROTOCOL_ERROR
    assert wire.host.receive(encode_open(50, 80)) == []
    assert decode_all(b"".join(wire.host.data_to_send()))[0].type == FrameType.RESET
    wire.guest.data_to_send()
    wire.guest.receive(encode_open(7, 80) + encode_open(8, 80))
    answers = decode_all(b"".join(wire.guest.data_to_send()))
    assert [(f.type, f.stream) for f in answers] == [(FrameType.REFUSE, 8)]
    assert decode_reason(answers[0])[0] == Reason.TOO_MANY_STREAMS


def test_garbage_mid_session_resets_the_channel_and_both_sides_start_over() -> None:
    wire = Wire().start()
    wire.open()
    events = wire.guest.receive(b"\xff" * 40 + encode_window(1, 5))
    assert events == [ChannelReset(Reason.PROTOCOL_ERROR, "unknown frame type 255", False)]
    wire.pump()
    assert of_type(wire.host_events, ChannelReset)[0].by_peer
    assert wire.host.phase is wire.guest.phase is Phase.ESTABLISHED
    assert len(of_type(wire.host_events, Established)) == 2
    assert wire.host.stream_count == wire.guest.stream_count == 0


def test_a_peer_that_makes_us_queue_answers_without_reading_is_reset() -> None:
    wire = Wire().start()
    events = wire.guest.receive(encode_frame(FrameType.PING, 0, b"12345678") * 120_000)
    assert of_type(events, ChannelReset)[0].code == Reason.FLOOD
    assert len(b"".join(wire.guest.data_to_send(1 << 30))) < 1000


def test_misuse_by_the_application_is_a_state_error() -> None:
    wire = Wire()
    wire.host.start()
    with pytest.raises(StateError):
        wire.host.open_stream(80)
    wire.guest.start()
    wire.pump()
    with pytest.raises(StateError):
        wire.guest.open_stream(80)
    stream = wire.open()
    wire.host.close(stream)
    with pytest.raises(StateError):
        wire.host.send(stream, b"late")
    with pytest.raises(StateError):
        wire.host.accept(stream)


def test_a_failed_session_says_why_and_ignores_what_comes_next() -> None:
    wire = Wire().start()
    wire.guest.fail(Reason.GOING_AWAY, "stopping")
    assert wire.guest.receive(HELLO.encode()) == []
    wire.pump()
    assert ChannelReset(Reason.GOING_AWAY, "stopping", True) in wire.host_events
    assert wire.host.phase is Phase.WAITING


# --- properties ----------------------------------------------------------------------------

streams = st.integers(1, 2**32 - 1)
texts = st.text(max_size=80)
valid_frames = st.one_of(
    st.builds(
        Hello,
        st.sampled_from(Role),
        st.integers(1, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.lists(st.integers(0, 65535), min_size=1, max_size=5).map(tuple),
        st.integers(16384, 65536),
        st.integers(1, 2**32 - 1),
        st.integers(1, MAX_WINDOW),
        texts,
    ).map(Hello.encode),
    st.builds(encode_reason, st.just(FrameType.ERROR), st.just(0), st.sampled_from(Reason), texts),
    st.builds(
        encode_frame,
        st.sampled_from([FrameType.PING, FrameType.PONG]),
        st.just(0),
        st.binary(max_size=64),
    ),
    st.builds(encode_open, streams, st.integers(1, 65535)),
    st.builds(encode_window, streams, st.integers(1, MAX_WINDOW)),
    st.builds(encode_frame, st.sampled_from([FrameType.ACCEPT, FrameType.CLOSE]), streams),
    st.builds(
        encode_reason,
        st.sampled_from([FrameType.REFUSE, FrameType.RESET]),
        streams,
        st.sampled_from(Reason),
        texts,
    ),
    st.builds(lambda s, b: data_header(s, len(b)) + b, streams, st.binary(max_size=3000)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_frames, max_size=20), st.lists(st.integers(0, 5000), max_size=6))
def test_any_sequence_of_valid_frames_round_trips_however_it_is_cut(
    encoded: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(encoded)
    decoder = FrameDecoder()
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    frames = [f for a, b in itertools.pairwise(bounds) for f in decoder.feed(data[a:b])]
    assert [
        HEADER.pack(f.type, 0, 0, f.stream, len(f.payload)) + f.payload for f in frames
    ] == encoded


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000), st.booleans())
def test_garbage_only_ever_raises_the_protocols_own_error(garbage: bytes, resync: bool) -> None:
    decoder = FrameDecoder(resync=resync)
    frames = decoder.feed(garbage)
    for _ in range(len(garbage) + 1):
        try:
            for frame in frames:
                assert frame.type in set(FrameType)
            return
        except ChannelError:
            frames = decoder.feed(b"")
    pytest.fail("the decoder made no progress")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), valid_frames), max_size=12))
def test_a_session_never_raises_on_what_the_peer_sends(pieces: list[bytes]) -> None:
    wire = Wire().start()
    stream = wire.open()
    for piece in pieces:
        wire.guest.receive(piece)
        wire.host.receive(piece)
    wire.guest.data_to_send()
    assert wire.guest.phase in (Phase.ESTABLISHED, Phase.WAITING, Phase.FAILED)
    assert wire.guest.buffered(stream) >= 0
