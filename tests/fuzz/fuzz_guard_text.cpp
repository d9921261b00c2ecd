/*
 * libFuzzer harness for the guard's text functions (scripts/engine/callrouter_guard_text.hpp):
 * the code that reads raw, possibly unparsable SIP bytes from the wire inside the engine.
 * Built with AddressSanitizer and UndefinedBehaviorSanitizer by scripts/fuzz.sh.
 *
 * Besides "no crash, no out-of-bounds read, no exception", it checks what the router
 * relies on:
 *  - cr_raw_headers: names are lower case, hold no ':' and no CRLF; values hold no CRLF;
 *  - cr_bad_name_addr: NULL or one of its reasons; a quoted display name (escaped as
 *    RFC 3261 s25.1 quoted-string) followed by a clean <addr-spec> is never refused,
 *    whatever the quoted text holds ('<' included); an unquoted display name holding a
 *    NUL (never a token character) is always refused;
 *  - cr_unparsable_response: empty, or one status line we chose (513 when the message
 *    was too large, with the same header lines as the 400/405/416), header lines
 *    "Name: value" each ended by CRLF with no other CR, LF or NUL (no injected header),
 *    only the header names we build, and the blank line only at the very end; the same
 *    datagram after leading CRLFs (RFC 5626 keep-alive) gets the same answer.
 */
#include "callrouter_guard_text.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

void fail(const char *what, const std::string &detail) {
    std::fprintf(stderr, "fuzz_guard_text: invariant broken: %s\n", what);
    std::string shown;
    for (unsigned char c : detail.substr(0, 600)) {
        char buf[8];
        if (c == '\r') shown += "\\r";
        else if (c == '\n') shown += "\\n\n";
        else if (c < 0x20 || c >= 0x7f) { std::snprintf(buf, sizeof(buf), "\\x%02x", c); shown += buf; }
        else shown += (char)c;
    }
    std::fprintf(stderr, "---\n%s\n---\n", shown.c_str());
    std::abort();
}

bool known_reason(const char *why) {
    static const char *const reasons[] = {"unterminated <addr-spec>", "whitespace inside <addr-spec>",
                                          "unquoted display name is not a token"};
    for (const char *r : reasons)
        if (std::strcmp(why, r) == 0) return true;
    return false;
}

void check_headers(const char *data, std::size_t size) {
    for (const auto &h : cr_raw_headers(data, size)) {
        if (h.first.find(':') != std::string::npos) fail("header name holds ':'", h.first);
        if (h.first.find("\r\n") != std::string::npos) fail("header name holds CRLF", h.first);
        if (h.second.find("\r\n") != std::string::npos) fail("header value holds CRLF", h.second);
        for (char c : h.first)
            if (c >= 'A' && c <= 'Z') fail("header name not lower case", h.first);
        const char *why = cr_bad_name_addr(h.second);
        if (why != NULL && !known_reason(why)) fail("unknown cr_bad_name_addr reason", why);
    }
}

/* An unquoted display name with a NUL in it is not a token (RFC 3261 s25.1). */
void check_unquoted_nul(const char *data, std::size_t size) {
    std::string name = "Al";
    for (std::size_t i = 0; i < size && i < 64; ++i)
        if (data[i] != '"' && data[i] != '<') name += data[i];
    name += '\0';
    std::string value = name + " <sip:alice@example.com>";
    if (cr_bad_name_addr(value) == NULL) fail("unquoted NUL accepted", value);
}

/* A quoted display name holding the input (escaped) before a clean addr-spec is valid. */
void check_quoted_display_name(const char *data, std::size_t size) {
    std::string quoted = "\"";
    for (std::size_t i = 0; i < size && i < 256; ++i) {
        char c = data[i];
        if (c == '"' || c == '\\') quoted += '\\';
        quoted += c;
    }
    quoted += "\"";
    for (const char *sep : {" ", "", "\t"}) {
        std::string value = quoted + sep + "<sip:alice@example.com>;tag=1";
        const char *why = cr_bad_name_addr(value);
        if (why != NULL) fail(why, value);
        why = cr_bad_name_addr(" " + value);
        if (why != NULL) fail(why, value);
    }
}

void check_response(const std::string &r) {
    if (r.empty()) return;
    static const char *const statuses[] = {"SIP/2.0 400 Bad Request\r\n",
                                           "SIP/2.0 405 Method Not Allowed\r\n",
                                           "SIP/2.0 416 Unsupported URI Scheme\r\n",
                                           "SIP/2.0 513 Message Too Large\r\n"};
    std::size_t eol = r.find("\r\n");
    bool status_ok = false;
    for (const char *s : statuses)
        if (r.compare(0, std::strlen(s), s) == 0) status_ok = true;
    if (!status_ok) fail("unexpected status line", r);
    if (r.size() < 4 || r.compare(r.size() - 4, 4, "\r\n\r\n") != 0) fail("response does not end with CRLFCRLF", r);
    if (r.find("\r\n\r\n") != r.size() - 4) fail("blank line inside the header block", r);
    if (r.find('\0') != std::string::npos) fail("NUL in response", r);
    for (std::size_t i = 0; i < r.size(); ++i) {
        if (r[i] == '\r' && (i + 1 >= r.size() || r[i + 1] != '\n')) fail("bare CR in response", r);
        if (r[i] == '\n' && (i == 0 || r[i - 1] != '\r')) fail("bare LF in response", r);
    }
    static const char *const names[] = {"Allow: ", "Via: ", "From: ", "To: ", "Call-ID: ", "CSeq: ",
                                        "Content-Length: "};
    std::size_t pos = eol + 2, end = r.size() - 2;
    int content_length = 0;
    while (pos < end) {
        std::size_t next = r.find("\r\n", pos);
        std::string line = r.substr(pos, next - pos);
        bool name_ok = false;
        for (const char *n : names)
            if (line.compare(0, std::strlen(n), n) == 0) name_ok = true;
        if (!name_ok) fail("header line we did not build", line);
        if (line.compare(0, 4, "To: ") == 0 && line.find("tag=") == std::string::npos)
            fail("To without tag", line);
        if (line.compare(0, 16, "Content-Length: ") == 0) {
            ++content_length;
            if (line != "Content-Length: 0") fail("Content-Length is not 0", line);
        }
        pos = next + 2;
    }
    if (content_length != 1) fail("not exactly one Content-Length", r);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *bytes, size_t size) {
    const char *data = (const char *)bytes;
    check_headers(data, size);
    {
        std::string whole(data, size);
        const char *why = cr_bad_name_addr(whole);
        if (why != NULL && !known_reason(why)) fail("unknown cr_bad_name_addr reason", why);
    }
    check_quoted_display_name(data, size);
    check_unquoted_nul(data, size);

    std::string r = cr_unparsable_response(data, size);
    check_response(r);
    /* Too large for the transport's buffer: the same answer under a 513 status line. */
    std::string big = cr_unparsable_response(data, size, true);
    check_response(big);
    if (big.empty() != r.empty()) fail("513 and 400/405/416 disagree on readability", std::string(data, size));
    if (!big.empty()) {
        std::string rest = r.substr(r.find("\r\n") + 2);
        if (rest.compare(0, 7, "Allow: ") == 0) rest = rest.substr(rest.find("\r\n") + 2);
        if (big != "SIP/2.0 513 Message Too Large\r\n" + rest) fail("513 answer differs", big);
    }

    /* Leading CRLFs (keep-alives, RFC 3261 s7.5) change nothing. */
    for (const char *prefix : {"\r\n", "\r\n\r\n", "\n"}) {
        std::string shifted = std::string(prefix) + std::string(data, size);
        /* An exact-size heap copy, so AddressSanitizer sees any read past the end. */
        char *copy = (char *)std::malloc(shifted.size());
        std::memcpy(copy, shifted.data(), shifted.size());
        std::string r2 = cr_unparsable_response(copy, shifted.size());
        std::free(copy);
        if (r2 != r) fail("leading CRLF changed the answer", shifted);
    }
    return 0;
}
