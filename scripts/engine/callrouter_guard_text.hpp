/* callrouter_guard text functions: the guard's pure string work on raw SIP bytes.
 *
 * No pjsip types here (std:: only), so the same code is compiled into the SWIG
 * module (through callrouter_guard_impl.hpp) and, alone, into the libFuzzer
 * harness tests/fuzz/fuzz_guard_text.cpp (scripts/fuzz.sh). Everything sits in an
 * anonymous namespace, like the rest of the guard: one translation unit each.
 *
 * Input is whatever arrived on the wire: any octets, any length, NUL included.
 * None of these functions may read outside [buf, buf + len) or throw.
 */
#ifndef CALLROUTER_GUARD_TEXT_HPP
#define CALLROUTER_GUARD_TEXT_HPP
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

const char *const CR_REFUSED[] = {"REFER", "MESSAGE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER"};
const char CR_ALLOW[] = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK";

/* Octets of CR and LF before the start line: RFC 5626 s4.4.1 keep-alives (a bare
 * CRLFCRLF datagram), or the CRLFs RFC 3261 s7.5 tells a receiver to ignore. */
std::size_t cr_leading_crlf(const char *buf, std::size_t len) {
    std::size_t i = 0;
    while (i < len && (buf[i] == '\r' || buf[i] == '\n')) ++i;
    return i;
}

/* ---- checks pjsip's liberal parser lets through (RFC 4475 s3.1.2) ---------------- */

/* The raw header lines of the message, unfolded (RFC 3261 s7.3.1), as (name, value). */
std::vector<std::pair<std::string, std::string>> cr_raw_headers(const char *buf, std::size_t len) {
    std::vector<std::pair<std::string, std::string>> out;
    if (buf == NULL) return out;
    std::size_t skip = cr_leading_crlf(buf, len);
    std::string text(buf + skip, len - skip);
    std::size_t end = text.find("\r\n\r\n");
    if (end == std::string::npos) end = text.size();
    std::size_t pos = text.find("\r\n");  /* skip the request line */
    std::string line;
    auto flush = [&]() {
        std::size_t colon = line.find(':');
        if (colon != std::string::npos) {
            std::string name = line.substr(0, colon);
            while (!name.empty() && (name.back() == ' ' || name.back() == '\t')) name.pop_back();
            for (char &c : name) c = (char)std::tolower((unsigned char)c);
            out.emplace_back(name, line.substr(colon + 1));
        }
        line.clear();
    };
    while (pos != std::string::npos && pos < end) {
        pos += 2;
        std::size_t next = text.find("\r\n", pos);
        std::string raw = text.substr(pos, (next == std::string::npos ? end : std::min(next, end)) - pos);
        if (!raw.empty() && (raw[0] == ' ' || raw[0] == '\t')) line += " " + raw;
        else { flush(); line = raw; }
        pos = next;
    }
    flush();
    return out;
}

bool cr_is_token_char(char c) {
    /* Octets >= 0x80 pass: unquoted UTF-8 names are common enough to tolerate. */
    return ((unsigned char)c & 0x80) || std::isalnum((unsigned char)c) ||
           (c != '\0' && std::strchr("-.!%*_+`'~ \t", c) != NULL);
}

/* RFC 3261 s20.10 / s25.1 name-addr: an unquoted display name is tokens only, and
 * nothing but the addr-spec sits between '<' and '>'. The '<' that opens the
 * addr-spec is the first one outside a quoted string: a quoted display name may hold
 * '<' (`"A < B" <sip:a@b>`), and a backslash inside quotes escapes the next octet. */
const char *cr_bad_name_addr(const std::string &value) {
    std::size_t lt = std::string::npos;
    bool quoted = false;
    for (std::size_t i = 0; i < value.size(); ++i) {
        char c = value[i];
        if (quoted) {
            if (c == '\\') ++i;            /* quoted-pair: skip the escaped octet */
            else if (c == '"') quoted = false;
        } else if (c == '"') {
            quoted = true;
        } else if (c == '<') {
            lt = i;
            break;
        }
    }
    if (lt == std::string::npos) return NULL;
    std::size_t gt = value.find('>', lt);
    if (gt == std::string::npos) return "unterminated <addr-spec>";
    if (std::isspace((unsigned char)value[lt + 1]) || std::isspace((unsigned char)value[gt - 1]))
        return "whitespace inside <addr-spec>";
    std::string display = value.substr(0, lt);
    if (display.find('"') != std::string::npos) return NULL;
    for (char c : display)
        if (!cr_is_token_char(c)) return "unquoted display name is not a token";
    return NULL;
}

/* ---- requests pjsip could not parse --------------------------------------------- */
/* pjsip drops an unparsable message silently. For a request whose Via, From, To,
 * Call-ID and CSeq lines can still be read, answer statelessly instead: 416 when the
 * Request-URI scheme is not sip/sips/tel (RFC 3261 s8.2.2.1), else 400 (s21.4.1). */

std::string cr_header_lines(const std::vector<std::pair<std::string, std::string>> &hs,
                            const char *full, const char *compact, bool all) {
    std::string out;
    for (const auto &h : hs) {
        if (h.first == full || h.first == compact) {
            std::string value = h.second;
            std::size_t b = value.find_first_not_of(" \t");
            value = b == std::string::npos ? "" : value.substr(b);
            out += std::string(full == std::string("call-id") ? "Call-ID" :
                               full == std::string("cseq") ? "CSeq" :
                               full == std::string("via") ? "Via" :
                               full == std::string("from") ? "From" : "To") + ": " + value + "\r\n";
            if (!all) break;
        }
    }
    return out;
}

/* True when `block` is header lines each ended by CRLF, with no other CR or LF and no
 * NUL: a value echoed into a response must not start a header line of its own. */
bool cr_clean_header_block(const std::string &block) {
    for (std::size_t i = 0; i < block.size(); ++i) {
        char c = block[i];
        if (c == '\0') return false;
        if (c == '\r' && (i + 1 >= block.size() || block[i + 1] != '\n')) return false;
        if (c == '\n' && (i == 0 || block[i - 1] != '\r')) return false;
    }
    return block.size() >= 2 && block.compare(block.size() - 2, 2, "\r\n") == 0;
}

/* `too_large`: the message did not fit the transport's buffer (a TCP message beyond
 * PJSIP_MAX_PKT_LEN): 513 Message Too Large (RFC 3261 s21.5.14) instead of 400/416. */
std::string cr_unparsable_response(const char *data, std::size_t len, bool too_large = false) {
    if (data == NULL) return "";
    std::size_t skip = cr_leading_crlf(data, len);
    data += skip;
    len -= skip;
    std::string text(data, len);
    std::size_t eol = text.find("\r\n");
    if (eol == std::string::npos) return "";
    std::string first = text.substr(0, eol);
    std::size_t sp1 = first.find(' '), sp2 = first.rfind(' ');
    if (sp1 == std::string::npos || sp2 <= sp1 || first.compare(sp2 + 1, 4, "SIP/") != 0)
        return "";  /* not a request line we can read */
    if (first.compare(0, sp1, "ACK") == 0 || first.compare(0, 4, "SIP/") == 0) return "";
    std::string method = first.substr(0, sp1);
    bool refused = false;
    for (const char *name : CR_REFUSED) refused = refused || method == name;
    std::string uri = first.substr(sp1 + 1, sp2 - sp1 - 1);
    std::string scheme = uri.substr(0, uri.find(':'));
    for (char &c : scheme) c = (char)std::tolower((unsigned char)c);
    bool known = scheme == "sip" || scheme == "sips" || scheme == "tel";
    auto hs = cr_raw_headers(data, len);
    std::string via = cr_header_lines(hs, "via", "v", true);
    std::string from = cr_header_lines(hs, "from", "f", false);
    std::string to = cr_header_lines(hs, "to", "t", false);
    std::string cid = cr_header_lines(hs, "call-id", "i", false);
    std::string cseq = cr_header_lines(hs, "cseq", "cseq", false);
    if (via.empty() || from.empty() || to.empty() || cid.empty() || cseq.empty()) return "";
    if (to.find("tag=") == std::string::npos) to.insert(to.size() - 2, ";tag=cr-unparsable");
    std::string echoed = via + from + to + cid + cseq;
    /* A bare CR or LF (or a NUL) in an echoed value: no answer rather than an
     * injected header line. */
    if (!cr_clean_header_block(echoed)) return "";
    /* A method we refuse anyway gets its 405 whatever else is wrong with it. */
    std::string status = too_large ? "SIP/2.0 513 Message Too Large\r\n"
                         : refused ? "SIP/2.0 405 Method Not Allowed\r\nAllow: " +
                                       std::string(CR_ALLOW) + "\r\n"
                         : known ? "SIP/2.0 400 Bad Request\r\n"
                                 : "SIP/2.0 416 Unsupported URI Scheme\r\n";
    return status + echoed + "Content-Length: 0\r\n\r\n";
}

}  // namespace

#endif
