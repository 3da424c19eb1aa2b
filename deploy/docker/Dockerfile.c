# A C application image: examples/c's publisher and subscriber, beside the Python app image.
#
# Built by deploy/scripts/build-c-image.sh on the same base image as the app image (made from
# this machine's Debian files; see Dockerfile.app), offline (`docker build --network none`).
# The context holds only the two binaries, which make -C libshimmy links with libshimmy and
# msgpack-c statically: the image needs nothing but the base's C library, and builds nothing.
#
# It joins the compose example's pipeline as one more app container: same IPC namespace as the
# daemon (`ipc: "service:shimmyd"`), the shimmy-run volume at /run/shimmy, group 10001 added
# (docs/containers.md); `subscriber demo/compose 10000 /tmp/ready` reads what the Python
# publisher sends, beside the Python subscriber.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
COPY publisher subscriber /opt/shimmy-c/
RUN python3 -c "import os; os.makedirs('/run/shimmy', exist_ok=True); os.chown('/run/shimmy', 10001, 10001); os.chmod('/run/shimmy', 0o750)"
ENV SHIMMY_DAEMON=/run/shimmy/shimmyd.sock \
    HOME=/tmp
USER 10001:10001
WORKDIR /opt/shimmy-c
CMD ["/opt/shimmy-c/subscriber", "demo/compose", "10000", "/tmp/shimmy-subscribed"]
