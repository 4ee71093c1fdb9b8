# Mailgate in a container: the same install path as the README (pip install .), run as a
# non-root user, with the config and the data (database, keys, certificates) on volumes.
#   docker build -t mailgate .
#   docker run --rm -v mailgate-conf:/etc/mailgate -v mailgate-data:/var/lib/mailgate mailgate init
#   docker run -d -p 587:8587 -p 465:8465 -p 8026:8026 -p 8025:8025 \
#       -v mailgate-conf:/etc/mailgate -v mailgate-data:/var/lib/mailgate mailgate
FROM python:3.11-slim

RUN groupadd --system mailgate && useradd --system --gid mailgate --home-dir /var/lib/mailgate \
        --shell /usr/sbin/nologin mailgate \
    && mkdir -p /etc/mailgate /var/lib/mailgate && chown mailgate:mailgate /etc/mailgate /var/lib/mailgate

WORKDIR /opt/mailgate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY hooks ./hooks
COPY crm_api ./crm_api
COPY conf ./conf
# `mailgate init` (first run, see above) writes /etc/mailgate/mailgate.toml and crm.toml with
# fresh secrets; conf/ holds the documented defaults for reference.
RUN pip install --no-cache-dir .

USER mailgate
WORKDIR /var/lib/mailgate
ENV MAILGATE_CONFIG=/etc/mailgate/mailgate.toml \
    MAILGATE_CRM_CONFIG=/etc/mailgate/crm.toml \
    MAILGATE_SUBMISSION__LISTEN=0.0.0.0 \
    MAILGATE_API__LISTEN=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/etc/mailgate", "/var/lib/mailgate"]
# Submission (STARTTLS), submission (implicit TLS), admin API, bundled CRM.
EXPOSE 8587 8465 8026 8025
ENTRYPOINT ["mailgate"]
CMD ["serve"]
