#!/usr/bin/env python3
"""s3-chunk-objects.py BUCKET PREFIX: "count bytes small small_bytes" of the chunk objects
(PREFIX/chunks/...) of a repository in BUCKET (small: under 64 KiB), listed with curl's
SigV4 as the AWS_* user of `scripts/s3-server.sh env` (the keys go to curl on a pipe).
Used by bench-s3-objsize.sh and bench-s3-writers.sh."""
import os, re, subprocess, sys, urllib.parse
ep = os.environ["AWS_ENDPOINT_URL"]
b, p = sys.argv[1], sys.argv[2]
sizes, token = [], None
while True:
    # parameters in sorted order: curl's SigV4 signs the query as given
    q = ("continuation-token=" + urllib.parse.quote(token, safe="") + "&" if token else "") + "list-type=2&max-keys=1000&prefix=" + urllib.parse.quote(p + "/chunks/", safe="")
    out = subprocess.run(["curl", "-s", "-K", "-", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                          "--aws-sigv4", "aws:amz:us-east-1:s3", f"{ep}/{b}?{q}"],
                         input=f'user = "{os.environ["AWS_ACCESS_KEY_ID"]}:{os.environ["AWS_SECRET_ACCESS_KEY"]}"\n',
                         capture_output=True, text=True, check=True).stdout
    if "<ListBucketResult" not in out:
        raise SystemExit(f"listing {b} failed: {out[:300]}")
    sizes += [int(x) for x in re.findall(r"<Size>(\d+)</Size>", out)]
    m = re.search(r"<NextContinuationToken>([^<]*)</NextContinuationToken>", out)
    if "<IsTruncated>true" not in out or not m:
        break
    token = m.group(1)
small = [s for s in sizes if s < 65536]
print(len(sizes), sum(sizes), len(small), sum(small))
