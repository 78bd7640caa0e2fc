/* bcryptprimitives.dll for Wine 8 (Debian 12), which lacks it: Rust's standard library
 * (1.78 and later) takes its random numbers from ProcessPrng there, so no Rust program
 * starts without it. A stand-in that asks BCryptGenRandom, as the real one does. Loaded
 * only by tests/wine/run; never shipped. */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (BCryptGenRandom(NULL, data, n, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
            return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
