import CLI
import VMM

VMMClock.markStart()
Vireo.main()
