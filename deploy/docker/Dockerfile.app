# An example application image: the shimmy SDK plus examples/compose_publisher.py and
# examples/compose_subscriber.py. Your own app image needs only the first stage's install line.
#
# Build context: a folder holding wheels/ (`pip wheel . -w wheels`) and examples/ (the repo root
# after `pip wheel . -w wheels` works). Offline build (`--network none`), no caches baked in.
#
#   pip wheel . -w wheels
#   docker build -f deploy/docker/Dockerfile.app -t shimmy-app .
#
# Runs as uid 10001, the daemon image's uid, so the daemon's socket and the shared-memory objects
# it creates are the app's own (see docs/containers.md, "Users and permissions").
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/shimmy \
 && /opt/shimmy/bin/python -m pip install --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheels shimmy \
 && /opt/shimmy/bin/python -c "import shimmy; shimmy.Channel"

FROM ${BASE_IMAGE}
COPY --from=build /opt/shimmy /opt/shimmy
COPY examples/compose_publisher.py examples/compose_subscriber.py /opt/shimmy-examples/
RUN python3 -c "import os; os.makedirs('/run/shimmy', exist_ok=True); os.chown('/run/shimmy', 10001, 10001); os.chmod('/run/shimmy', 0o755)"
ENV PATH=/opt/shimmy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    SHIMMY_DAEMON=/run/shimmy/shimmyd.sock
USER 10001:10001
WORKDIR /opt/shimmy-examples
CMD ["python", "/opt/shimmy-examples/compose_subscriber.py"]
