#!/usr/bin/env python3
"""Test vectors for src/upstream/iam.rs, produced by botocore's own SigV4 presigner.

Prints the ElastiCache IAM auth tokens that `iam::token` must reproduce byte for byte
(the unit tests in src/upstream/iam.rs hold them as literals). Re-run with

    pip install botocore && python3 scripts/iam_token_vector.py

The clock is frozen by patching `botocore.auth.get_current_datetime`, the only source of
the signing time in `SigV4Auth.add_auth` (botocore >= 1.3x; older releases called
`datetime.datetime.utcnow()` there instead).
"""

import datetime
import hashlib
import hmac
import unittest.mock

import botocore
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
# Fake, but with the characters real session tokens carry ('/', '+', '=').
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE//////////+SessionToken/ab+c=="
REGION = "us-east-1"
CACHE = "my-cache"
USER = "iam-user-01"
NOW = datetime.datetime(2024, 1, 1, 0, 0, 0)  # naive UTC, as botocore uses it
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def token(cache, user, region, serverless, session_token):
    params = {"Action": "connect", "User": user}
    if serverless:
        params["ResourceType"] = "ServerlessCache"
    req = AWSRequest(method="GET", url=f"http://{cache}/", params=params)
    creds = Credentials(ACCESS_KEY, SECRET_KEY, session_token)
    with unittest.mock.patch("botocore.auth.get_current_datetime", return_value=NOW):
        SigV4QueryAuth(creds, "elasticache", region, expires=900).add_auth(req)
    assert req.url.startswith("http://")
    return req.url[len("http://"):]


def signing_key(secret, date, region, service):
    k = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k.hex()


def main():
    print(f"botocore {botocore.__version__}")
    # AWS General Reference, "Examples of how to derive a signing key for Signature Version 4".
    print("signing key:", signing_key(SECRET_KEY, "20120215", "us-east-1", "iam"))
    # AWS General Reference, "Signature Version 4 signing process" worked example
    # (IAM ListUsers, 2015-08-30T12:36:00Z, header-signed): hash of the canonical
    # request, signing key, signature.
    canonical = "\n".join([
        "GET", "/", "Action=ListUsers&Version=2010-05-08",
        "content-type:application/x-www-form-urlencoded; charset=utf-8",
        "host:iam.amazonaws.com", "x-amz-date:20150830T123600Z", "",
        "content-type;host;x-amz-date", EMPTY_SHA256,
    ])
    creq_hash = hashlib.sha256(canonical.encode()).hexdigest()
    sts = f"AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\n{creq_hash}"
    key = signing_key(SECRET_KEY, "20150830", "us-east-1", "iam")
    sig = hmac.new(bytes.fromhex(key), sts.encode(), hashlib.sha256).hexdigest()
    print("ListUsers example:", creq_hash, key, sig)
    print("no session token:")
    print(token(CACHE, USER, REGION, False, None))
    print("with session token:")
    print(token(CACHE, USER, REGION, False, SESSION_TOKEN))
    print("serverless:")
    print(token(CACHE, USER, REGION, True, None))
    # Exercises the encoder and host handling: botocore keeps the name's case in the URL
    # but signs the lowercased host.
    print("odd user id, mixed-case cache name, eu-west-2, session token:")
    print(token("My-Cache", "odd user+/=~._-\u00fc", "eu-west-2", False, SESSION_TOKEN))


if __name__ == "__main__":
    main()
