# An example application image: the shimmy SDK plus examples/compose_publisher.py and
# examples/compose_subscriber.py.  Your own app image needs only the first stage's install line.
#
# Built by deploy/scripts/build-images.sh (see Dockerfile.daemon): the context holds wheels/ and
# examples/; offline (`docker build --network none`), no caches baked in.
#
# The image's default user is 10001:10001, but apps need not be the daemon's uid: with the
# daemon's channel_group set to 10001 ("shimmy", as both shipped deployments do) any uid in that
# group reaches the socket, maps the rings and may use every channel (compose: `user` +
# `group_add`; Kubernetes: `runAsGroup: 10001`, since the daemon sees only the primary gid
# there).  See docs/containers.md, "Users, groups and permissions".
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
RUN python3 -c "import os; os.makedirs('/run/shimmy', exist_ok=True); os.chown('/run/shimmy', 10001, 10001); os.chmod('/run/shimmy', 0o750)"
ENV PATH=/opt/shimmy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    SHIMMY_DAEMON=/run/shimmy/shimmyd.sock
USER 10001:10001
WORKDIR /opt/shimmy-examples
CMD ["python", "/opt/shimmy-examples/compose_subscriber.py"]
