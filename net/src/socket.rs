//! Socket options every Keel connection gets.

use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

use crate::limits::TCP_UNACKED_MAX;

/// No Nagle delay, and a bound on unacknowledged data (`TCP_UNACKED_MAX`).
pub(crate) fn configure(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let ms = libc::c_uint::try_from(TCP_UNACKED_MAX.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: setsockopt(2) on a socket this process owns, with a pointer to a c_uint
    // that outlives the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
