#!/usr/bin/env bash
# Installs what the `devices` cargo feature of peercall-media (real audio devices
# through cpal/ALSA) needs to build on Debian/Ubuntu. The default build needs none
# of it.
set -euo pipefail
sudo_cmd=""
[[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
if ! pkg-config --exists alsa 2>/dev/null; then
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libasound2-dev pkg-config
fi
