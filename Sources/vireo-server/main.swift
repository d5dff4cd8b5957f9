#if canImport(Glibc)
import Glibc
#endif

// As `vireo` itself: everything the server makes is its owner's alone unless it says otherwise.
umask(0o077)
Serve.main()
