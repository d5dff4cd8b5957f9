import GuestMemory

extension GuestMemory {
    /// Copies up to `limit` bytes out of a chain's buffers, in order; every address is checked.
    func gather(_ buffers: [VirtqBuffer], limit: Int) throws(VirtioError) -> [UInt8] {
        var bytes: [UInt8] = []
        for buffer in buffers where bytes.count < limit {
            let take = min(Int(buffer.length), limit - bytes.count)
            do { bytes += try readBytes(count: take, at: buffer.address) } catch { throw .bufferOutsideMemory(buffer.address, length: buffer.length) }
        }
        return bytes
    }

    /// Copies bytes into a chain's buffers, in order, as far as they reach; returns the count written.
    func scatter(_ bytes: ArraySlice<UInt8>, into buffers: [VirtqBuffer]) throws(VirtioError) -> UInt32 {
        var done = 0
        let start = bytes.startIndex
        for buffer in buffers where done < bytes.count {
            let take = min(Int(buffer.length), bytes.count - done)
            do { try write(bytes[start + done..<start + done + take], at: buffer.address) } catch {
                throw .bufferOutsideMemory(buffer.address, length: buffer.length)
            }
            done += take
        }
        return UInt32(done)
    }
}
