import CLI
import VMM
#if canImport(Glibc)
import Glibc
#endif

VMMClock.markStart()
// Everything Vireo makes is its owner's alone unless it says otherwise (a VM's directory for its
// jail's group, an image's files): guest data, definitions and sockets are nobody else's.
umask(0o077)
Vireo.main()
