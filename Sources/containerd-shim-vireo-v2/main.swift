import ContainerShim
import Foundation

ShimMain.run(CommandLine.arguments)
