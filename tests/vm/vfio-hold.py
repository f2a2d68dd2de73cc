#!/usr/bin/env python3
"""Hold a VFIO device open the way a VMM does, optionally with only its *device* fd left.

    vfio-hold.py --device ADDR [--keep-group] --ready FILE

Opens the container (/dev/vfio/vfio) and ADDR's group (/dev/vfio/N), attaches the group to the
container, sets a type1 IOMMU and gets the device fd (VFIO_GROUP_GET_DEVICE_FD). Then, unless
--keep-group, it closes the group and container fds: only the device fd remains, which
/proc/PID/fd shows as `anon_inode:[vfio-device]` (the kernel keeps the group alive through the
device). A process like that holds the device as firmly as one with /dev/vfio/N open: unbinding
the device from vfio-pci blocks in the kernel until the process closes it or exits.

When the device fd is open, writes this process's pid to FILE, then sleeps until SIGTERM or
SIGINT (exit 0). Exit 1 (message on stderr) when any step fails; FILE is not written then.
stdlib only: the test bed's guest runs the host's python3.
"""
import argparse
import array
import fcntl
import os
import signal
import sys

# <linux/vfio.h>: _IO(VFIO_TYPE=';', VFIO_BASE=100 + n). No argument size is encoded.
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0


def fail(msg):
    print(f"vfio-hold: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="PCI address, e.g. 0000:01:10.0")
    ap.add_argument("--keep-group", action="store_true",
                    help="keep the group and container fds open too")
    ap.add_argument("--ready", required=True, help="file to write the pid to once holding")
    args = ap.parse_args()

    link = f"/sys/bus/pci/devices/{args.device}/iommu_group"
    try:
        group_id = os.path.basename(os.readlink(link))
    except OSError as e:
        fail(f"{args.device}: no IOMMU group ({e})")

    try:
        container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        version = fcntl.ioctl(container, VFIO_GET_API_VERSION)
        if version != VFIO_API_VERSION:
            fail(f"unknown VFIO API version {version}")
        group = os.open(f"/dev/vfio/{group_id}", os.O_RDWR | os.O_CLOEXEC)

        # struct vfio_group_status { __u32 argsz; __u32 flags; }
        status = array.array("I", [8, 0])
        fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, status, True)
        if not status[1] & VFIO_GROUP_FLAGS_VIABLE:
            fail(f"group {group_id} is not viable (a member is bound to a host driver)")

        fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, array.array("i", [container]), True)
        for iommu in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU):
            if fcntl.ioctl(container, VFIO_CHECK_EXTENSION, iommu) == 1:
                fcntl.ioctl(container, VFIO_SET_IOMMU, iommu)
                break
        else:
            fail("the container supports neither type1v2 nor type1 IOMMU")

        # The argument is a char *: a mutable buffer makes ioctl() return the syscall's result
        # (the new fd) instead of a copy of the buffer.
        name = bytearray(args.device.encode() + b"\0")
        device = fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name, True)
    except OSError as e:
        fail(f"{args.device} (group {group_id}): {e}")

    if not args.keep_group:
        os.close(group)
        os.close(container)

    # Blocked and waited for, so a signal that comes before the wait is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    tmp = f"{args.ready}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, args.ready)
    print(f"vfio-hold: pid {os.getpid()} holds {args.device} as fd {device}"
          f"{' with group and container' if args.keep_group else ' (device fd only)'}",
          file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os.close(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
