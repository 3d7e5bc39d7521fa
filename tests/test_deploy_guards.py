"""--mode=serve against hostile or mistaken clients, and deployed artifacts against out-of-range inputs."""

import time

from test_serve import digits_run, inprocess_server, raw_exchange  # noqa: F401 (fixtures)


def test_a_trickled_request_head_gets_a_408_within_the_socket_timeout(inprocess_server):
  """Was: the socket's timeout restarted with every byte, so a request line or headers sent a byte every 0.4 s
  (slowloris) held a thread for as long as they came, and a timeout then closed it with no reply."""
  for sent, trickle in [(b"", b"POST /v1/predict HTTP/1.1\r\n"),
                        (b"POST /v1/predict HTTP/1.1\r\n", b"Host: x\r\nContent-Type: application/json\r\n\r\n")]:
    status, reply, seconds = raw_exchange(inprocess_server, sent, trickle, every_s=0.3)
    assert status == "HTTP/1.1 408 Request Timeout" and b"request line and headers" in reply, reply
    assert seconds < 4, seconds  # the 2 s head deadline, not 30 bytes x 0.3 s
  start = time.monotonic()  # the server is free for the next client
  status, reply, _ = raw_exchange(inprocess_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
  assert status == "HTTP/1.1 200 OK" and time.monotonic() - start < 1, reply
