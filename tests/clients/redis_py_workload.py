"""A small workload through tierproxy with redis-py, the most used Python client.

usage: redis_py_workload.py HOST PORT PROTOCOL(2|3) PREFIX
Exits non-zero (with a traceback) on the first wrong answer.
"""
import sys

import redis

host, port, proto, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
r = redis.Redis(host=host, port=port, protocol=proto, decode_responses=True,
                socket_timeout=10, client_name="pytest-worker")

assert r.ping() is True
assert r.client_getname() == "pytest-worker"
k = lambda n: f"{prefix}:{n}"

assert r.set(k("s"), "v1", ex=100) is True
assert r.get(k("s")) == "v1"
assert 0 < r.ttl(k("s")) <= 100
assert r.incr(k("n")) == 1 and r.incrby(k("n"), 9) == 10

keys = [k(f"m{i}") for i in range(30)]
assert r.mset({key: str(i) for i, key in enumerate(keys)}) is True
assert r.mget(keys + [k("missing")]) == [str(i) for i in range(30)] + [None]
assert r.exists(*keys) == 30

assert r.hset(k("h"), mapping={"a": "1", "b": "2"}) == 2
assert r.hgetall(k("h")) == {"a": "1", "b": "2"}
assert r.rpush(k("l"), "x", "y", "z") == 3
assert r.lrange(k("l"), 0, -1) == ["x", "y", "z"]
assert r.sadd(k("set"), "a", "b") == 2
assert r.smembers(k("set")) == {"a", "b"}
assert r.zadd(k("z"), {"m": 1.5}) == 1
assert r.zscore(k("z"), "m") == 1.5
assert r.zrange(k("z"), 0, -1, withscores=True) == [("m", 1.5)] or \
    r.zrange(k("z"), 0, -1, withscores=True) == [["m", 1.5]]

pipe = r.pipeline(transaction=False)
for i in range(100):
    pipe.set(k(f"p{i}"), i)
    pipe.get(k(f"p{i}"))
res = pipe.execute()
assert res[1::2] == [str(i) for i in range(100)]

seen = set(r.scan_iter(match=f"{prefix}:p*", count=50))
assert seen == {k(f"p{i}") for i in range(100)}, len(seen)

try:
    r.execute_command("NOSUCHCOMMAND")
    raise AssertionError("error expected")
except redis.ResponseError as e:
    assert "unknown command" in str(e)

assert r.delete(*keys) == 30
print(f"redis-py RESP{proto}: ok")
